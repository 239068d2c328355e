"""Checkpoints: sharded safetensors, the shared weight reader, hub names through a fake local hub cache (no network)."""
import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from seqmix.io import load, parse_size, read_weights, resolve_model_dir, save
from seqmix.cli import main
from seqmix.config import resolve_model
from seqmix.io.importers.based_repo import convert_based_repo
from seqmix.model import build_model
from test_convert import BASED, published_state_dict, write_checkpoint

VOCAB = BASED["vocab_size"]

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def tiny(tie: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    cfg = resolve_model("conv,based:feature_dim=4,swa:5,attn,mlp", d_model=32, n_heads=4, vocab_size=61)
    cfg.tie_embeddings = tie
    return build_model(cfg)


def tokens(vocab: int = 61, seed: int = 1):
    return torch.randint(0, vocab, (3, 63), generator=torch.Generator().manual_seed(seed))


def assert_same_logits(a, b, vocab: int = 61):
    ids = tokens(vocab)
    with torch.no_grad():
        la, lb = a(ids), b(ids)
    assert not la.isnan().any() and torch.equal(la, lb)


def fake_hub_cache(cache, repo_id: str, src, commit: str = COMMIT):
    """The files of directory `src` laid out as huggingface_hub caches repo `repo_id` at branch main."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(src, repo / "snapshots" / commit)
    return cache


# -- sizes --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,want", [(1234, 1234), ("500MB", 500 * 10**6), ("5GB", 5 * 10**9),
                                       ("2GiB", 2 * 2**30), (" 1.5 kb ", 1500), ("64KiB", 65536), ("77", 77)])
def test_parse_size(size, want):
    assert parse_size(size) == want


@pytest.mark.parametrize("bad", ["5 bananas", "", "GB", "-1MB", "0", 0, -5, True, 2.5])
def test_parse_size_rejects_and_shows_an_accepted_form(bad):
    with pytest.raises(ValueError, match="'5GB'"):
        parse_size(bad)


# -- sharded save -------------------------------------------------------------------------------------
@pytest.mark.parametrize("tie", [True, False])
def test_sharded_round_trip(tmp_path, tie):
    model = tiny(tie)
    state = model.state_dict()
    assert ("lm_head.weight" in state) != tie  # a tied head is not stored twice
    sizes = {k: v.nbytes for k, v in state.items()}
    limit = sum(sizes.values()) // 5
    d = save(model, tmp_path / "m", max_shard_size=limit)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in d.glob("*.safetensors"))
    n = len(files)
    assert n >= 3 and not (d / "model.safetensors").exists()
    assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert index["metadata"]["total_size"] == sum(sizes.values())
    assert list(index["weight_map"]) == list(state)  # every tensor, in state_dict order
    assert [index["weight_map"][k] for k in state] == sorted(index["weight_map"][k] for k in state)
    for f in files:
        with safe_open(str(d / f), "pt") as fh:
            keys = set(fh.keys())
        assert keys == {k for k, v in index["weight_map"].items() if v == f}
        assert (d / f).stat().st_size <= limit  # safetensors header included
    again = load(d)
    assert again.config == model.config
    assert_same_logits(again, model)
    save(again, d)  # re-saving unsharded replaces the whole folder: no stale shards
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors"]


def test_no_shard_file_exceeds_the_limit_headers_included(tmp_path):
    """Limits just above the largest tensor pack shards tightly; counting tensor bytes only overflows them."""
    model = tiny()
    for limit in range(17_000, 40_000, 1_500):
        d = save(model, tmp_path / "m", max_shard_size=limit)
        sizes = {f.name: f.stat().st_size for f in d.glob("*.safetensors")}
        assert len(sizes) > 1 and max(sizes.values()) <= limit, (limit, sizes)


def test_tensor_larger_than_the_limit_gets_its_own_shard(tmp_path):
    model = tiny()
    limit = model.embed.weight.nbytes // 2
    d = save(model, tmp_path / "m", max_shard_size=limit)
    weight_map = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    alone = [k for k, f in weight_map.items() if f == weight_map["embed.weight"]]
    assert alone == ["embed.weight"] and (d / weight_map["embed.weight"]).stat().st_size > limit
    assert_same_logits(load(d), model)


def test_missing_shard_is_named(tmp_path):
    d = save(tiny(), tmp_path / "m", max_shard_size="20KB")
    second = sorted(d.glob("model-*.safetensors"))[1]
    second.unlink()
    with pytest.raises(FileNotFoundError, match=second.name):
        load(d)


def test_model_prefix_is_stripped_only_when_every_key_has_it(tmp_path):
    model = tiny()
    d = save(model, tmp_path / "m")
    t = load_file(str(d / "model.safetensors"))
    save_file({"model." + k: v for k, v in t.items()}, str(d / "model.safetensors"))
    assert_same_logits(load(d), model)
    t["model.embed.weight"] = t.pop("embed.weight")
    save_file(t, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match=r"(?s)missing keys: \['embed.weight'\].*unexpected keys: "
                                         r"\['model.embed.weight'\]"):
        load(d)


# -- Based-repo .bin shards ---------------------------------------------------------------------------
def test_sharded_based_repo_bin_loads_like_the_single_file(tmp_path):
    single = write_checkpoint(tmp_path / "single", BASED)
    sd = published_state_dict(BASED)  # with the `model.` prefix and a metrics entry, as published
    keys = list(sd)
    shards = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(single / "config.json", sharded)
    for name, ks in shards.items():
        torch.save({k: sd[k] for k in ks}, sharded / name)
    index = {"metadata": {"total_size": sum(v.nbytes for v in sd.values())},
             "weight_map": {k: name for name, ks in shards.items() for k in ks}}
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    assert set(read_weights(sharded)) == set(sd)
    assert_same_logits(convert_based_repo(sharded), convert_based_repo(single), VOCAB)
    (sharded / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(FileNotFoundError, match="pytorch_model-00002-of-00002.bin"):
        convert_based_repo(sharded)


# -- hub names (a fake cache; never the network) ------------------------------------------------------
def test_hub_name_loads_a_sharded_seqmix_model_from_the_cache(tmp_path):
    import huggingface_hub  # noqa: F401  (make install-test installs it)
    model = tiny()
    cache = fake_hub_cache(tmp_path / "hub", "org/name", save(model, tmp_path / "m", max_shard_size="20KB"))
    got = load("org/name", cache_dir=cache, local_files_only=True)
    assert_same_logits(got, model)
    path = resolve_model_dir("org/name", revision=COMMIT, cache_dir=cache, local_files_only=True)
    assert path == cache / "models--org--name" / "snapshots" / COMMIT


def test_hub_name_not_in_the_cache_says_what_to_do(tmp_path):
    import huggingface_hub  # noqa: F401  (make install-test installs it)
    cache = fake_hub_cache(tmp_path / "hub", "org/name", save(tiny(), tmp_path / "m"))
    with pytest.raises(FileNotFoundError, match=r"(?s)org/missing.*local_files_only=True.*local directory"):
        load("org/missing", cache_dir=cache, local_files_only=True)
    with pytest.raises(FileNotFoundError, match="revision 'v2'"):
        load("org/name", revision="v2", cache_dir=cache, local_files_only=True)


@pytest.mark.parametrize("name", ["./no/such/dir", "/no/such", "a/b/c", "single", "org/name..x", "org/-"])
def test_missing_local_paths_and_malformed_names_are_not_sent_to_the_hub(name, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no directory .*'org/name'"):
        resolve_model_dir(name, cache_dir=tmp_path, local_files_only=True)


def test_hub_without_huggingface_hub_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "huggingface_hub", None)
    with pytest.raises(ImportError, match="pip install huggingface_hub"):
        resolve_model_dir("org/name", cache_dir=tmp_path)
    assert resolve_model_dir(tmp_path) == tmp_path  # local directories never need it


def test_based_repo_checkpoint_on_the_hub_is_imported_by_load(tmp_path):
    import huggingface_hub  # noqa: F401  (make install-test installs it)
    src = write_checkpoint(tmp_path / "based", BASED)
    cache = fake_hub_cache(tmp_path / "hub", "hazyresearch/based-tiny", src)
    got = load("hazyresearch/based-tiny", cache_dir=cache, local_files_only=True)
    want = convert_based_repo(src)
    assert got.config == want.config
    assert_same_logits(got, want, VOCAB)
    wide = load("hazyresearch/based-tiny", cache_dir=cache, local_files_only=True, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in wide.parameters())
    with torch.no_grad():
        assert torch.allclose(wide(tokens(VOCAB)).float(), want(tokens(VOCAB)), atol=1e-4)
    same = load("hazyresearch/based-tiny", cache_dir=cache, local_files_only=True)
    assert_same_logits(same, want, VOCAB)


def test_convert_cli_accepts_a_hub_name(tmp_path):
    import huggingface_hub  # noqa: F401  (make install-test installs it)
    src = write_checkpoint(tmp_path / "based", BASED)
    cache = fake_hub_cache(tmp_path / "hub", "hazyresearch/based-tiny", src)
    run = CliRunner().invoke
    r = run(main, ["convert", "hazyresearch/based-tiny", str(tmp_path / "out"), "--cache-dir", str(cache),
                   "--local-files-only", "--revision", "main"])
    assert r.exit_code == 0, r.output
    assert_same_logits(load(tmp_path / "out"), convert_based_repo(src), VOCAB)
    r = run(main, ["convert", "hazyresearch/nope", str(tmp_path / "out2"), "--cache-dir", str(cache),
                   "--local-files-only"])
    assert r.exit_code == 2 and "hazyresearch/nope" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "out2").exists()
