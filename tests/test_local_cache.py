"""Local copies of remote files and folders (`infra.local_cache`): named by content, never left half-written."""
from __future__ import annotations

import os

import pytest

from sftcurate.infra.local_cache import file_sha256, folder_key, local_copy, remote_folder_key


def put_folder(s3_env, files: dict[str, bytes]) -> str:
    import s3fs

    from sftcurate.infra.settings import load_settings

    uri = f"s3://{s3_env()}/folder"
    fs = s3fs.S3FileSystem(**load_settings().s3.storage_options())
    for rel, data in files.items():
        fs.pipe_file(f"{uri}/{rel}", data)
    return uri


def test_a_file_hash_follows_its_content_and_is_remembered(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 100)
    first = file_sha256(f)
    assert file_sha256(f) == first
    f.write_bytes(b"b" * 100)                       # same size, new bytes
    os.utime(f, ns=(1, 1))                          # and an mtime no earlier write had
    assert file_sha256(f) != first
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x").write_bytes(b"x")
    key = folder_key(tmp_path)
    (tmp_path / "sub" / "x").rename(tmp_path / "sub" / "y")   # same bytes under another name
    assert folder_key(tmp_path) != key


def test_a_remote_folder_is_copied_whole_and_a_changed_one_gets_a_new_copy(tmp_path, s3_env):
    uri = put_folder(s3_env, {"config.json": b"{}", "weights/part-0.bin": b"0" * 1000})
    key = remote_folder_key(uri)
    copy = local_copy(uri, tmp_path, key)
    assert (copy / "config.json").read_bytes() == b"{}" and (copy / "weights/part-0.bin").read_bytes() == b"0" * 1000
    assert local_copy(uri, tmp_path, key) == copy                # the key names the content: no second fetch

    import s3fs

    from sftcurate.infra.settings import load_settings
    s3fs.S3FileSystem(**load_settings().s3.storage_options()).pipe_file(f"{uri}/weights/part-0.bin", b"1" * 1000)
    new_key = remote_folder_key(uri)
    assert new_key != key
    assert (local_copy(uri, tmp_path, new_key) / "weights/part-0.bin").read_bytes() == b"1" * 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([key, new_key])   # no temporary left behind


def test_a_refused_or_failed_fetch_keeps_nothing(tmp_path, s3_env):
    uri = put_folder(s3_env, {"a.bin": b"a"})

    def refuse(tmp):
        assert tmp.exists()
        raise ValueError("bad bytes")

    with pytest.raises(ValueError, match="bad bytes"):
        local_copy(f"{uri}/a.bin", tmp_path, "a.bin", verify=refuse)
    with pytest.raises(FileNotFoundError):
        local_copy(f"{uri}/missing.bin", tmp_path, "missing.bin")
    assert list(tmp_path.iterdir()) == []
