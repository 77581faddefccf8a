"""The streaming safetensors writer the legacy rebuilds use: shards, index, order, read-back."""

from __future__ import annotations

import json

import numpy as np
import pytest

from orca_diff.legacy import SafetensorsWriter, state_dict_order, verify_written
from orca_diff.errors import VerificationError
from orca_diff.containers import TensorInfo, open_model


def infos() -> list[TensorInfo]:
    return [TensorInfo("model.embed_tokens.weight", "F16", (40, 8)), TensorInfo("model.layers.0.mlp.up_proj.weight", "F32", (8, 8)),
            TensorInfo("model.norm.weight", "F32", (8,)), TensorInfo("empty", "F16", (0, 8)),
            TensorInfo("lm_head.weight", "BF16", (40, 8))]


def data(info: TensorInfo) -> bytes:
    return np.random.default_rng(info.numel).bytes(info.nbytes)


def test_tensors_written_in_pieces_read_back_identical_across_shards_with_an_index(tmp_path):
    w = SafetensorsWriter(tmp_path, infos(), max_shard_bytes=700)
    for i in infos():
        w.begin(i.name)
        raw = data(i)
        for s in range(0, len(raw), 100):
            w.write(np.frombuffer(raw[s:s + 100], np.uint8))
    w.close()
    assert len(w.file_names) == 3 and all((tmp_path / n).is_file() for n in w.file_names)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == {i.name for i in infos()}
    m = open_model(tmp_path)
    for i in infos():
        assert m.tensors[i.name] == i and bytes(m.read(i.name)) == data(i)
    assert verify_written(tmp_path, w)


def test_out_of_order_or_incomplete_tensors_are_programming_errors(tmp_path):
    w = SafetensorsWriter(tmp_path, infos())
    with pytest.raises(RuntimeError, match="out of order"):
        w.begin("lm_head.weight")
    w.begin("model.embed_tokens.weight")
    with pytest.raises(RuntimeError, match="too many"):
        w.write(b"x" * 641)
    with pytest.raises(RuntimeError, match="incomplete"):
        w.close()


def test_a_shard_changed_after_writing_fails_the_read_back(tmp_path):
    w = SafetensorsWriter(tmp_path, infos()[:1])
    w.begin("model.embed_tokens.weight")
    w.write(data(infos()[0]))
    w.close()
    f = tmp_path / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 1
    f.write_bytes(bytes(raw))
    with pytest.raises(VerificationError, match="reads back differently"):
        verify_written(tmp_path, w)


def test_state_dict_order_is_llamas_module_order():
    names = ["lm_head.weight", "model.norm.weight", "model.layers.10.mlp.up_proj.weight", "x",
             "model.layers.2.self_attn.q_proj.weight", "model.layers.2.input_layernorm.weight", "model.embed_tokens.weight"]
    assert state_dict_order(names) == ["model.embed_tokens.weight", "model.layers.2.self_attn.q_proj.weight",
                                       "model.layers.2.input_layernorm.weight", "model.layers.10.mlp.up_proj.weight",
                                       "model.norm.weight", "lm_head.weight", "x"]
