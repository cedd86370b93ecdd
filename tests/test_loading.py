"""Checkpoint loading: sharded folders (``model.safetensors.index.json``), tensors read one at a
time into the serving dtype, and damaged checkpoints refused with the file and tensor named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tandem.errors import ModelLoadError
from tandem.models.loading import load_model
from tests.tiny_models import build_tiny

VOCAB = 64


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same tiny Qwen2 (biases, tied head) saved whole and in several shards with an index."""
    whole, sharded = tmp_path_factory.mktemp("whole"), tmp_path_factory.mktemp("sharded")
    hf = build_tiny("qwen2", whole, VOCAB)
    hf.save_pretrained(sharded, max_shard_size="40KB")
    assert len(list(sharded.glob("*.safetensors"))) > 2 and (sharded / "model.safetensors.index.json").is_file()
    return whole, sharded


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_sharded_checkpoint_loads_what_one_file_holds(folders: tuple[Path, Path], dtype: torch.dtype) -> None:
    whole, sharded = (load_model(f, dtype)[0].state_dict() for f in folders)
    assert whole.keys() == sharded.keys()
    for name, tensor in whole.items():
        assert tensor.dtype == dtype and torch.equal(tensor, sharded[name]), name


def _copy(folder: Path, to: Path) -> Path:
    to.mkdir()
    for file in folder.iterdir():
        (to / file.name).write_bytes(file.read_bytes())
    return to


def _edit(folder: Path, edit) -> None:
    """Rewrite the (single) safetensors file of ``folder`` with ``edit`` applied to its tensors."""
    file = next(folder.glob("*.safetensors"))
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_a_missing_shard_is_named(folders: tuple[Path, Path], tmp_path: Path) -> None:
    broken = _copy(folders[1], tmp_path / "broken")
    lost = sorted(broken.glob("*.safetensors"))[1]
    lost.unlink()
    with pytest.raises(ModelLoadError, match=f"lists '{lost.name}', which is missing"):
        load_model(broken)


def test_a_tensor_of_the_wrong_shape_is_named(folders: tuple[Path, Path], tmp_path: Path) -> None:
    broken = _copy(folders[0], tmp_path / "broken")
    name = "model.layers.1.mlp.up_proj.weight"
    _edit(broken, lambda t: t.update({name: t[name][:-1].clone()}))
    with pytest.raises(
        ModelLoadError, match=rf"'{name}' in '.*model.safetensors' has shape \[127, 64\]; the config needs \[128, 64\]"
    ):
        load_model(broken)


def test_missing_and_unused_tensors_are_named(folders: tuple[Path, Path], tmp_path: Path) -> None:
    missing = _copy(folders[0], tmp_path / "missing")
    _edit(missing, lambda t: t.pop("model.layers.0.self_attn.k_proj.bias"))
    with pytest.raises(ModelLoadError, match="has no tensor 'layers.0.self_attn.k_proj.bias'"):
        load_model(missing)
    extra = _copy(folders[0], tmp_path / "extra")
    _edit(extra, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}))
    with pytest.raises(ModelLoadError, match=r"tensors the config does not use: \['layers.0.mlp.extra.weight'\]"):
        load_model(extra)


def test_a_damaged_index_is_refused(folders: tuple[Path, Path], tmp_path: Path) -> None:
    broken = _copy(folders[1], tmp_path / "broken")
    (broken / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ModelLoadError, match="is not a safetensors index"):
        load_model(broken)
