"""Our GGUF header reader against the `gguf` package's GGUFReader, on the real 270M file."""

import re

import gguf
import numpy as np
import pytest
from conftest import _plain_view_reader

from kaggle_pipeline.checkpoints import CheckpointError, load_checkpoint
from kaggle_pipeline.checkpoints.gguf_header import HeaderError, read_header
from kaggle_pipeline.checkpoints.packaged import gemma3_270m_gguf


def test_header_matches_gguf_reader_on_the_packaged_270m():
    path = gemma3_270m_gguf()
    reference = _plain_view_reader()(path)
    header = read_header(path, string_arrays=("tokenizer.ggml.tokens",))

    fields = {k: f for k, f in reference.fields.items() if not k.startswith("GGUF.")}
    skipped = {k for k, f in fields.items()
               if f.types[:2] == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING]
               and k != "tokenizer.ggml.tokens"}
    assert set(header.metadata) == set(fields) - skipped
    for key, value in header.metadata.items():
        expected = fields[key].contents()
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(value, expected, err_msg=key)
        elif isinstance(value, float):  # written as f32: the shortest decimal that reads back
            assert np.float32(value) == np.float32(expected), key
        else:
            assert value == expected, key

    assert list(header.tensors) == [t.name for t in reference.tensors]
    for t in reference.tensors:
        ours = header.tensors[t.name]
        assert (ours.qtype, ours.shape, ours.offset, ours.nbytes) == (
            t.tensor_type, tuple(int(n) for n in reversed(t.shape)), t.data_offset, t.n_bytes)
    assert {t.qtype.name for t in header.tensors.values()} >= {"Q4_K", "Q6_K"}


def test_a_cut_or_foreign_file_names_the_file(tmp_path):
    path = gemma3_270m_gguf()
    data_start = min(t.offset for t in read_header(path).tensors.values())
    whole = path.read_bytes()[:data_start + (1 << 20)]  # the header and a little of the data
    in_index = whole.index(b"blk.5.attn_k.weight") + 5  # a tensor's name, cut short
    for name, blob, reason in [
            ("cut_in_metadata.gguf", whole[:50_000], "corrupt or truncated GGUF header"),
            ("cut_in_data.gguf", whole, "runs past the end of the file"),
            ("cut_in_index.gguf", whole[:in_index], "corrupt or truncated GGUF header"),
            ("not.gguf", b"PK\x03\x04 a zip", "not a GGUF file")]:
        path = tmp_path / name
        path.write_bytes(blob)
        with pytest.raises(HeaderError, match=re.escape(f"{path}: ") + ".*" + re.escape(reason)):
            read_header(path)
        with pytest.raises(CheckpointError, match=re.escape(
                f"{path}: not a readable GGUF file (") + ".*" + re.escape(reason)):
            load_checkpoint(path)
