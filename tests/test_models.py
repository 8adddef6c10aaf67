"""Model resolution: tiny-gpt2 from config, local and s3:// folders, the built-in SmolLM2, hub ids."""
from __future__ import annotations

import pytest
import torch

from sftcurate.infra.models import BUILTIN_SMOLLM2, ModelSpecError, local_folder, model_fingerprint, resolve_model, \
    resolve_tokenizer


def logits(loaded, text="def add(a, b): return a + b"):
    ids = loaded.tokenizer(text, return_tensors="pt")
    with torch.inference_mode():
        return loaded.model(**ids, output_hidden_states=True)


def test_tiny_gpt2_is_deterministic_and_offline():
    a, b = resolve_model("tiny-gpt2"), resolve_model("tiny-gpt2")
    assert torch.equal(logits(a).logits, logits(b).logits)
    other = resolve_model("tiny-gpt2:seed=1,n_embd=32")
    assert other.model.config.n_embd == 32 and not torch.equal(logits(a).logits[..., :5], logits(other).logits[..., :5])
    assert resolve_tokenizer("tiny-gpt2").eos_token_id is not None
    with pytest.raises(ModelSpecError, match="unknown option 'depth'"):
        resolve_model("tiny-gpt2:depth=3")


def test_local_and_s3_folders_load_the_same_weights(tmp_path, s3_env):
    import s3fs

    tiny = resolve_model("tiny-gpt2")
    folder = tmp_path / "saved"
    tiny.model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    from_folder = resolve_model(str(folder))
    assert torch.allclose(logits(from_folder).logits, logits(tiny).logits, atol=1e-6)
    assert model_fingerprint(str(folder)).startswith("folder:")

    bucket = s3_env()
    from sftcurate.infra.settings import load_settings

    fs = s3fs.S3FileSystem(**load_settings().s3.storage_options())
    fs.put(str(folder) + "/", f"{bucket}/models/tiny/", recursive=True)
    from_s3 = resolve_model(f"s3://{bucket}/models/tiny")
    assert torch.allclose(logits(from_s3).logits, logits(tiny).logits, atol=1e-6)


def test_weights_overwritten_in_place_get_new_keys_and_are_loaded(tmp_path, s3_env):
    """A new fine-tune saved over a local folder and an s3:// folder: same file names and sizes (model.safetensors
    over 1 MB, which the old fingerprint took by size only), new weights. The cache keys change and the new
    weights load (the s3 copy was named by its URI and served the old ones)."""
    import s3fs

    from sftcurate.infra.settings import load_settings

    folder, spec = tmp_path / "target", "tiny-gpt2:n_embd=128"
    base = resolve_model(spec)
    base.model.save_pretrained(folder)
    base.tokenizer.save_pretrained(folder)
    assert (folder / "model.safetensors").stat().st_size > 1 << 20
    fs = s3fs.S3FileSystem(**load_settings().s3.storage_options())
    remote = f"s3://{s3_env()}/models/target"
    fs.put(str(folder) + "/", remote[len("s3://"):] + "/", recursive=True)
    before = {str(folder): model_fingerprint(str(folder)), remote: model_fingerprint(remote)}
    assert torch.allclose(logits(resolve_model(remote)).logits, logits(base).logits, atol=1e-6)

    size = (folder / "model.safetensors").stat().st_size
    tuned = resolve_model(spec + ",seed=1")
    tuned.model.save_pretrained(folder)
    assert (folder / "model.safetensors").stat().st_size == size
    fs.put(str(folder) + "/", remote[len("s3://"):] + "/", recursive=True)
    for where, fingerprint in before.items():
        assert model_fingerprint(where) != fingerprint
        assert torch.allclose(logits(resolve_model(where)).logits, logits(tuned).logits, atol=1e-6)


def test_missing_folder_and_hub_ids():
    with pytest.raises(ModelSpecError, match="folder not found"):
        resolve_model("./no/such/model")
    assert local_folder("HuggingFaceTB/SmolLM2-135M-Instruct") is None  # goes to the hub loader
    assert model_fingerprint("HuggingFaceTB/SmolLM2-135M-Instruct").startswith("hub:")


def test_builtin_smollm2_converts_to_a_trainable_pre_logit_model():
    loaded = resolve_model(BUILTIN_SMOLLM2)
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert loaded.model.config.hidden_size == 576 and not hasattr(loaded.model.config, "quantization_config")
    out = logits(loaded)
    # hidden_states[-1] is after the final norm: lm_head of it is the logits (the FisherSFT feature).
    with torch.inference_mode():
        assert torch.allclose(loaded.model.lm_head(out.hidden_states[-1]), out.logits, atol=1e-4)
    assert all(p.requires_grad for p in loaded.model.parameters())
    assert (local_folder(BUILTIN_SMOLLM2) / "model.safetensors").exists()


def test_any_gguf_file_converts_once_and_matches_the_builtin():
    from sftcurate.infra.models import SMOLLM2_GGUF, smollm2_gguf_folder

    with pytest.raises(ModelSpecError, match="GGUF file not found"):
        resolve_model("gguf:/no/such/model.gguf")
    spec = f"gguf:{smollm2_gguf_folder() / SMOLLM2_GGUF}"
    loaded, builtin = resolve_model(spec), resolve_model(BUILTIN_SMOLLM2)
    assert local_folder(spec) != local_folder(BUILTIN_SMOLLM2) and (local_folder(spec) / "model.safetensors").exists()
    assert model_fingerprint(spec).startswith("gguf:SmolLM2-135M-Instruct")
    assert torch.equal(loaded.model.lm_head.weight, builtin.model.lm_head.weight)


# ---------------------------------------------------------------- one line for every model we refuse (issue 28)

def test_a_folder_of_pickled_weights_and_an_empty_folder_are_refused_before_loading(tmp_path):
    import json

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    torch.save({"w": torch.zeros(2)}, pickled / "pytorch_model.bin")
    with pytest.raises(ModelSpecError, match=r"its weights are a pickle \(pytorch_model.bin\).*safetensors"):
        model_fingerprint(str(pickled))
    with pytest.raises(ModelSpecError, match="its weights are a pickle"):
        resolve_model(str(pickled))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSpecError, match="the folder is empty"):
        model_fingerprint(str(tmp_path / "empty"))
    (tmp_path / "noconfig").mkdir()
    (tmp_path / "noconfig" / "model.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(ModelSpecError, match=r"model '.*noconfig': the tokenizer could not be loaded"):
        resolve_tokenizer(str(tmp_path / "noconfig"))


def test_hub_failures_are_one_line_of_their_kind():
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    from sftcurate.data_contracts.errors import DependencyError
    from sftcurate.infra.models import load_or_explain

    def fails(error):
        def load():
            try:
                raise error
            except Exception as exc:  # transformers wraps the hub's error in an OSError, as here
                raise OSError("We couldn't connect to 'https://huggingface.co' to load the files") from exc
        return load

    with pytest.raises(DependencyError, match="hub could not be reached .* not in the local cache"):
        load_or_explain("org/model", "model", fails(LocalEntryNotFoundError("outgoing traffic has been disabled")))
    import httpx

    response = httpx.Response(404, request=httpx.Request("GET", "https://huggingface.co/org/model"))
    try:
        missing = RepositoryNotFoundError("404 Repository Not Found", response=response)
    except TypeError:  # older huggingface_hub: requests' response
        import requests

        missing = RepositoryNotFoundError("404 Repository Not Found", response=requests.Response())
    with pytest.raises(ModelSpecError, match="has no such model at revision main"):
        load_or_explain("org/model", "model", fails(missing))
