"""Bad checkpoint files become one-screen errors naming the file and the fix, never a traceback (issue 18, items 2, 8
and 10): truncated or garbage safetensors / .bin, pickled code in a .bin, config.json of the wrong shape, shard
indexes naming files outside the model folder, and a full disk while saving; through seqmix.io.load (a
CheckpointFileError / SaveError), `seqmix generate` and `seqmix convert`."""
import errno
import json
import os

import pytest
import torch
from click.testing import CliRunner

from seqmix.cli import main
from seqmix.config import resolve_model
from seqmix.io import CheckpointFileError, SaveError, load, save
from seqmix.model import build_model


SHARD = "6KB"  # tiny() is 17 KB: three shards or more


def tiny(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(resolve_model("conv,mlp", d_model=16, n_heads=2, vocab_size=64))


def cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and r.exception is None or isinstance(r.exception, SystemExit)
    return " ".join(r.output.split())


def generate(d):
    return cli("generate", d, "--prompt", "hi", "--tokenizer", "bytes", "--device", "cpu", "--max-new-tokens", "2")


def based_checkpoint(path):
    from test_convert import BASED, write_checkpoint

    return write_checkpoint(path, BASED)


# -- item 10: damaged weights ---------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_damaged_safetensors_file_is_named(tmp_path, damage):
    d = save(tiny(), tmp_path / "m")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"not a model at all" * 10, "empty": b""}[damage])
    with pytest.raises(CheckpointFileError, match=rf"{f} is not a readable safetensors file.*truncated or damaged"):
        load(d)
    assert f"{f} is not a readable safetensors file" in generate(d)
    assert f"{f} is not a readable safetensors file" in cli("convert", d, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_bin_file_is_named(tmp_path, damage):
    d = based_checkpoint(tmp_path / "based")
    f = d / "pytorch_model.bin"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 3] if damage == "truncated" else b"\x80\x02garbage" * 50)
    with pytest.raises(CheckpointFileError, match=rf"{f} is not a readable PyTorch .*truncated or damaged"):
        load(d)
    assert f"{f} is not a readable PyTorch" in cli("convert", d, tmp_path / "out")
    assert f"{f} is not a readable PyTorch" in generate(d)


# -- item 2: pickled code ---------------------------------------------------------------------------------
class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_bin_with_pickled_code_is_refused_in_seqmix_words(tmp_path):
    d = based_checkpoint(tmp_path / "based")
    marker = tmp_path / "ran"
    sd = torch.load(d / "pytorch_model.bin", weights_only=True)
    sd["model.train_metrics.acc"] = _RunsCode(marker)
    torch.save(sd, d / "pytorch_model.bin")
    with pytest.raises(CheckpointFileError) as e:
        load(d)
    msg = str(e.value)
    assert "holds pickled objects other than tensors (it calls posix.system)" in msg and "weights_only=True" in msg
    assert "weights_only=False" not in msg and "weights_only` set to `False`" not in msg
    out = cli("convert", d, tmp_path / "out")
    assert "pickled objects other than tensors" in out and "False" not in out
    assert not marker.exists()


# -- item 10: config.json ---------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg,want", [
    ([1, 2, 3], "holds a JSON list, not an object of config keys"),
    ({"model_type": "seqmix", "d_model": 16}, "lacks 'spec'"),
    ({"model_type": "seqmix", "spec": "conv,mlp", "d_model": "16"}, "has d_model='16', not an int"),
    ({"model_type": "seqmix", "spec": "conv,mlp", "tie_embeddings": "yes"}, "has tie_embeddings='yes', not a bool"),
    ({"model_type": "seqmix", "spec": "conv,mlp", "d_model": True}, "has d_model=True, not an int"),
    ({"model_type": "seqmix", "spec": "conv,mlp", "depth": 3}, "unknown model config keys ['depth']"),
    ({"model_type": "seqmix", "spec": "conv,mpl"}, "describes a model seqmix cannot build here"),
    ("{not json", "is not valid JSON"),
])
def test_a_bad_config_json_is_named(tmp_path, cfg, want):
    d = save(tiny(), tmp_path / "m")
    (d / "config.json").write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
    with pytest.raises(CheckpointFileError, match="config.json") as e:
        load(d)
    assert want in str(e.value)
    assert want in generate(d) and str(d / "config.json") in generate(d)
    assert want in cli("convert", d, tmp_path / "out")


# -- item 8: paths outside the model folder ---------------------------------------------------------------
def _shard_index(d, name):
    index = json.loads((d / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = name
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("name", ["../other/FIRST", "ABS", "../../etc/passwd", "sub/../../x.safetensors"])
def test_a_shard_index_naming_a_file_outside_the_folder_is_refused(tmp_path, name):
    other = save(tiny(1), tmp_path / "other", max_shard_size=SHARD)  # a real, loadable file outside
    d = save(tiny(0), tmp_path / "m", max_shard_size=SHARD)
    first = sorted(other.glob("model-*.safetensors"))[0]
    _shard_index(d, str(first) if name == "ABS" else name.replace("FIRST", first.name))
    with pytest.raises(CheckpointFileError, match="not a file name inside"):
        load(d)
    assert "not a file name inside" in generate(d)


def test_a_shard_linking_out_of_the_folder_is_refused(tmp_path):
    other = save(tiny(1), tmp_path / "other", max_shard_size=SHARD)
    d = save(tiny(0), tmp_path / "m", max_shard_size=SHARD)
    shard = sorted(d.glob("model-*.safetensors"))[0]
    shard.unlink()
    shard.symlink_to(other / shard.name)
    with pytest.raises(CheckpointFileError, match=rf"links to {other / shard.name}, outside the model folder"):
        load(d)
    single = save(tiny(0), tmp_path / "s")
    (single / "model.safetensors").unlink()
    (single / "model.safetensors").symlink_to(save(tiny(1), tmp_path / "s2") / "model.safetensors")
    with pytest.raises(CheckpointFileError, match="outside the model folder"):
        load(single)


def test_hub_cache_snapshots_link_into_their_own_blobs(tmp_path):
    """huggingface_hub stores snapshots/<rev>/<file> as links to ../../blobs/<hash>: those stay allowed."""
    model = tiny()
    src = save(model, tmp_path / "m", max_shard_size=SHARD)
    repo = tmp_path / "hub" / "models--org--name"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for i, f in enumerate(sorted(src.iterdir())):
        (blobs / f"blob{i}").write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(f"../../blobs/blob{i}")
    again = load(snap)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))


# -- item 10: a full disk ---------------------------------------------------------------------------------
def _disk_full(monkeypatch, after: int = 0):
    import safetensors.torch

    real, calls = safetensors.torch.save_file, [0]

    def save_file(tensors, filename, metadata=None):
        calls[0] += 1
        if calls[0] > after:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


def test_a_full_disk_during_save_leaves_the_old_model_and_says_so(tmp_path, monkeypatch):
    d = save(tiny(0), tmp_path / "m")
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    _disk_full(monkeypatch, after=1)  # the second shard does not fit
    with pytest.raises(SaveError, match=rf"saving {d} failed: model-00002-of-0000\d.safetensors: no space left on "
                                        rf"the device of {tmp_path}.*free some space or save elsewhere"):
        save(tiny(1), d, max_shard_size=SHARD)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_a_full_disk_through_build_save_and_convert_is_a_message(tmp_path, monkeypatch):
    src = save(tiny(0), tmp_path / "src")
    _disk_full(monkeypatch)
    out = cli("build", "conv,mlp", "--d-model", "16", "--heads", "2", "--vocab", "64", "--save", tmp_path / "new")
    assert "no space left on the device" in out and "model.safetensors" in out
    out = cli("convert", src, tmp_path / "conv")
    assert "no space left on the device" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
