"""Training recipes and their pure parts: schema errors, every shipped recipe, DeepSpeed config, LR schedule,
weight-decay groups, token shards and the resumable batch order (no DeepSpeed process group needed)."""
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from seqmix.model import build_model
from seqmix.tokenizer import tokenizer_vocab_size
from seqmix.train.data import PackedTokens, StepSampler, _records_to_docs, get_batch, prepare_data
from seqmix.train.ds_config import build_ds_config
from seqmix.train.loop import lr_multiplier, model_config, param_groups
from seqmix.train.schema import DataSection, OptimSection, RecipeError, find_recipe, grad_accum_steps, load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
# Published counts (REFERENCE.md) for based-360m, based-1b, attn-360m; the others pin today's model code.
EXPECTED_PARAMS = {
    "tiny": 544_000,
    "based-360m": 362_620_928,
    "based-1b": 1_349_453_056,
    "attn-360m": 359_810_048,
    "attn-1b": 1_327_080_720,  # GatedMlp rounds int(8 * 1680 / 3) = 4480 up to 4608 (REFERENCE.md)
    "mamba-360m": 358_165_504,
    "mamba-1b": 1_319_262_208,
    "example-based-360m-wikitext103": 362_620_928,
}


def _yaml(tmp_path, text: str, name: str = "r") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


# -- the shipped recipes ----------------------------------------------------------------------------------
def test_every_recipe_is_listed_here():
    assert sorted(p.stem for p in RECIPES.glob("*.yaml")) == sorted(EXPECTED_PARAMS)


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_every_recipe_loads_and_builds_on_meta_with_the_expected_parameter_count(name):
    recipe = load_recipe(find_recipe(name, [RECIPES]))
    assert recipe.name == name and recipe.train.run_dir == f"runs/{name}"
    model = build_model(model_config(recipe, tokenizer_vocab_size(recipe.data.tokenizer)), device="meta")
    assert model.num_params() == EXPECTED_PARAMS[name]
    assert model.config.max_seqlen == recipe.data.seq_len
    build_ds_config(recipe, world_size=1)


@pytest.mark.parametrize("name", ["based-360m", "based-1b", "attn-360m", "attn-1b", "mamba-360m", "mamba-1b"])
def test_reference_recipes_carry_the_published_hyperparameters(name):
    r = load_recipe(RECIPES / f"{name}.yaml")
    o = r.optim
    assert (o.lr, o.min_lr, list(o.betas), o.weight_decay, o.warmup_steps, o.grad_clip) == (
        8e-4, 8e-5, [0.9, 0.95], 0.1, 200, 1.0)
    assert (r.train.steps, r.train.global_batch, r.data.seq_len, r.train.dtype) == (20000, 256, 2048, "bf16")
    assert r.model.arch == name and r.data.tokenizer == "gpt2"


def test_train_compile_is_on_for_cuda_below_zero_3_unless_set():
    from seqmix.train.loop import compiles

    r = load_recipe(RECIPES / "based-360m.yaml")
    assert r.train.compile is None and compiles(r, "cuda") and not compiles(r, "cpu")
    assert not compiles(load_recipe(RECIPES / "based-360m.yaml", ["zero.stage=3"]), "cuda")
    assert compiles(load_recipe(RECIPES / "tiny.yaml", ["train.compile=true"]), "cpu")
    assert not compiles(load_recipe(RECIPES / "tiny.yaml", ["train.compile=false"]), "cuda")


# -- errors name the key ----------------------------------------------------------------------------------
@pytest.mark.parametrize("text, key", [
    ("train:\n  stpes: 3\n", "train.stpes"),
    ("train:\n  steps: many\n", "train.steps"),
    ("train:\n  steps: 2.5\n", "train.steps"),
    ("optim:\n  betas: [0.9, x]\n", "optim.betas"),
    ("trian:\n  steps: 3\n", "trian"),
    ("zero:\n  stage: 4\n", "zero.stage"),
    ("train:\n  dtype: float8\n", "train.dtype"),
    ("data:\n  source: files\n", "data.files"),
    ("model:\n  arch: based-360m\n  spec: mlp\n", "model"),
    ("model:\n  arch: based-7b\n", "model.arch"),
    ("optim:\n  min_lr: 1.0\n", "optim.min_lr"),
    ("zero:\n  offload_param: cpu\n", "zero.offload_param"),
    ("train:\n  compile: true\nzero:\n  stage: 3\n", "train.compile"),
    ("train:\n  compile: maybe\n", "train.compile"),
])
def test_a_bad_key_or_value_in_the_yaml_is_an_error_naming_the_key(tmp_path, text, key):
    path = _yaml(tmp_path, "model:\n  spec: mlp\n" + text if not text.startswith("model") else text)
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert key in str(e.value)


@pytest.mark.parametrize("override, key", [
    ("train.stpes=3", "train.stpes"),
    ("zero.stage=two", "zero.stage"),
    ("data.seq_len=-1", "data.seq_len"),
    ("log.every=0", "log.every"),
    ("train.steps", "train.steps"),  # no '='
])
def test_a_bad_override_is_an_error_naming_the_key(override, key):
    with pytest.raises(RecipeError) as e:
        load_recipe(RECIPES / "tiny.yaml", [override])
    assert key in str(e.value)


def test_a_misspelt_key_gets_a_suggestion():
    with pytest.raises(RecipeError, match="Did you mean.*steps"):
        load_recipe(RECIPES / "tiny.yaml", ["train.stpes=3"])


def test_overrides_are_applied_and_typed_and_interpolations_resolve(tmp_path):
    r = load_recipe(RECIPES / "tiny.yaml", ["train.steps=7", "zero.stage=3", "data.seq_len=64", "name=x",
                                            "optim.betas=[0.8,0.9]"])
    assert (r.train.steps, r.zero.stage, r.data.seq_len, r.name, r.optim.betas) == (7, 3, 64, "x", [0.8, 0.9])
    assert r.train.run_dir == "runs/x"


def test_an_unknown_recipe_name_suggests_the_closest():
    with pytest.raises(RecipeError, match="Did you mean 'tiny'"):
        find_recipe("tiyn", [RECIPES])


# -- gradient accumulation and the DeepSpeed config -------------------------------------------------------
def test_gradient_accumulation_is_derived_from_global_micro_and_world():
    assert grad_accum_steps(256, 8, 8) == 4
    assert grad_accum_steps(256, 8, 1) == 32
    assert grad_accum_steps(8, 8, 1) == 1


@pytest.mark.parametrize("world", [3, 5, 6, 7])
def test_a_global_batch_that_does_not_divide_is_an_error_that_says_what_fits(world):
    recipe = load_recipe(RECIPES / "based-360m.yaml")
    with pytest.raises(RecipeError, match="train.global_batch=256 is not divisible") as e:
        build_ds_config(recipe, world_size=world)
    assert "micro_batch" in str(e.value)


def test_ds_config_follows_the_recipe():
    r = load_recipe(RECIPES / "based-1b.yaml", ["zero.stage=3", "zero.offload_optimizer=cpu", "train.dtype=bf16"])
    c = build_ds_config(r, world_size=16)
    assert (c["train_batch_size"], c["train_micro_batch_size_per_gpu"], c["gradient_accumulation_steps"]) == (256, 4, 4)
    assert c["zero_optimization"]["stage"] == 3 and c["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert c["bf16"]["enabled"] and not c["fp16"]["enabled"] and c["gradient_clipping"] == 1.0
    tiny = load_recipe(RECIPES / "tiny.yaml")
    assert [build_ds_config(tiny, world_size=w)["gradient_accumulation_steps"] for w in (1, 2)] == [2, 1]
    assert not build_ds_config(tiny, world_size=1)["bf16"]["enabled"]


# -- schedule and weight decay ----------------------------------------------------------------------------
def test_lr_schedule_warms_up_linearly_then_follows_a_cosine_to_min_lr():
    o = OptimSection(lr=8e-4, min_lr=8e-5, warmup_steps=200)
    lr = [o.lr * lr_multiplier(s, o, 20000) for s in range(20001)]
    assert lr[0] == pytest.approx(8e-4 / 200) and lr[199] == pytest.approx(8e-4) and lr[200] == pytest.approx(8e-4)
    assert lr[20000] == pytest.approx(8e-5) and min(lr[200:]) == pytest.approx(8e-5)
    assert all(a >= b for a, b in zip(lr[200:], lr[201:]))
    mid = 200 + (20000 - 200) // 2
    assert lr[mid] == pytest.approx(8e-5 + (8e-4 - 8e-5) / 2, rel=1e-3)


def test_no_weight_decay_on_norms_biases_embeddings_and_marked_parameters():
    recipe = load_recipe(RECIPES / "tiny.yaml", ["model.spec=conv,mamba,mlp"])
    model = build_model(model_config(recipe, 257), device="meta")
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    d = {names[id(p)] for p in decay["params"]}
    nd = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "embed.weight" in nd and not any("norm" in n for n in d) and not any(n.endswith("bias") for n in d)
    assert any(n.endswith("A_log") for n in nd) and any(n.endswith(".D") for n in nd)
    assert any("fc1" in n or "in_proj" in n for n in d)
    assert len(d) + len(nd) == len(list(model.parameters()))


# -- data -------------------------------------------------------------------------------------------------
def test_doc_regex_starts_a_new_document_at_each_matching_record():
    rows = [" = A = \n", "\n", " x \n", " = = sub = = \n", " y \n", " = B = \n", " z \n"]
    docs = list(_records_to_docs(rows, r"^ = [^=].* = $"))
    assert docs == [" = A = \n\n x \n = = sub = = \n y \n", " = B = \n z \n"]
    assert list(_records_to_docs(["a", " ", "b"], None)) == ["a", "b"]


def _corpus(tmp_path) -> DataSection:
    (tmp_path / "a.txt").write_text("hello world " * 50)
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "second doc"}) + "\n" + json.dumps({"text": "third"}) + "\n")
    return DataSection(source="files", files=[str(tmp_path / "*.txt"), str(tmp_path / "*.jsonl")],
                       tokenizer="bytes", seq_len=16, val_fraction=0.1, cache_dir=str(tmp_path / "cache"),
                       shard_tokens=100)


def test_shards_hold_every_document_with_eos_after_each_and_a_held_out_tail(tmp_path):
    data = _corpus(tmp_path)
    out = prepare_data(data)
    meta = json.loads((out / "meta.json").read_text())
    dt = np.dtype(meta["dtype"])
    stream = np.concatenate([np.fromfile(out / s["file"], dtype=dt) for split in ("train", "val")
                             for s in meta[split]])
    eos = np.array([256], dtype=np.int64)
    want = np.concatenate([np.concatenate([np.frombuffer(t.encode(), np.uint8), eos])
                           for t in ["hello world " * 50, "second doc", "third"]])
    assert np.array_equal(stream, want)
    assert meta["dtype"] == "uint16" and meta["documents"] == 3 and len(meta["train"]) == 6  # 100-token shards
    assert sum(s["tokens"] for s in meta["val"]) == int(stream.size * 0.1)
    mtime = (out / "meta.json").stat().st_mtime_ns
    assert prepare_data(data) == out and (out / "meta.json").stat().st_mtime_ns == mtime  # cached
    assert not list(Path(data.cache_dir).glob(".*tmp*"))


def test_packed_windows_are_shifted_pairs_within_a_shard(tmp_path):
    out = prepare_data(_corpus(tmp_path))
    ds = PackedTokens(out, "train", 16)
    assert len(ds) == sum((s["tokens"] - 1) // 16 for s in ds.meta["train"] if s["tokens"] > 16)
    x, y = get_batch(ds, np.arange(len(ds)))
    assert x.shape == (len(ds), 16) and torch.equal(x[:, 1:], y[:, :-1])
    assert x.dtype == torch.int64 and int(x.max()) <= 256


@pytest.mark.parametrize("world, micro", [(1, 8), (2, 4), (4, 1), (8, 1)])
def test_a_step_uses_the_same_samples_for_any_world_size_and_micro_batch(world, micro):
    ref = StepSampler(37, global_batch=8, micro_batch=8, world_size=1, rank=0, seed=3)
    for step in (0, 3, 4, 9):  # 37 samples: steps 4 and 9 straddle an epoch boundary
        got = [StepSampler(37, global_batch=8, micro_batch=micro, world_size=world, rank=r, seed=3).indices(step, m)
               for m in range(8 // (micro * world)) for r in range(world)]
        assert sorted(np.concatenate(got).tolist()) == sorted(ref.indices(step, 0).tolist())


def test_each_epoch_is_a_seeded_permutation_of_every_sample():
    s = StepSampler(40, global_batch=8, micro_batch=8, world_size=1, rank=0, seed=0)
    epoch0 = np.concatenate([s.indices(k, 0) for k in range(5)])
    epoch1 = np.concatenate([s.indices(k, 0) for k in range(5, 10)])
    assert sorted(epoch0.tolist()) == list(range(40)) == sorted(epoch1.tolist())
    assert not np.array_equal(epoch0, epoch1) and not np.array_equal(epoch0, np.arange(40))
    again = StepSampler(40, global_batch=8, micro_batch=8, world_size=1, rank=0, seed=0)
    assert np.array_equal(again.indices(7, 0), s.indices(7, 0))
    other = StepSampler(40, global_batch=8, micro_batch=8, world_size=1, rank=0, seed=1)
    assert not np.array_equal(other.indices(0, 0), s.indices(0, 0))


def test_the_embedded_corpus_tokenises_to_a_few_hundred_thousand_bytes(tmp_path):
    out = prepare_data(DataSection(source="embedded", tokenizer="bytes", cache_dir=str(tmp_path)))
    meta = json.loads((out / "meta.json").read_text())
    total = sum(s["tokens"] for split in ("train", "val") for s in meta[split])
    assert meta["documents"] == 4 and 300_000 < total < 500_000
    assert math.isclose(sum(s["tokens"] for s in meta["val"]) / total, 0.02, rel_tol=0.01)


def test_a_hugging_face_dataset_is_split_into_articles_with_its_own_validation_split(tmp_path, monkeypatch):
    import types

    rows = {"train": [" = A = \n", " first article \n", " = = Sub = = \n", " more \n", " = B = \n", " second \n"],
            "validation": [" = V = \n", " held out \n"]}
    calls = []

    def load_dataset(path, name=None, split=None, streaming=False):
        calls.append((path, name, split, streaming))
        return [{"text": r} for r in rows[split]]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    data = DataSection(source="hf", hf_path="Salesforce/wikitext", hf_name="wikitext-103-raw-v1",
                       hf_val_split="validation", doc_regex=r"^ = [^=].* = $", tokenizer="bytes",
                       cache_dir=str(tmp_path), hf_streaming=True)
    out = prepare_data(data)
    meta = json.loads((out / "meta.json").read_text())
    assert calls == [("Salesforce/wikitext", "wikitext-103-raw-v1", "train", True),
                     ("Salesforce/wikitext", "wikitext-103-raw-v1", "validation", True)]
    train = np.concatenate([np.fromfile(out / s["file"], dtype=np.uint16) for s in meta["train"]])
    val = np.concatenate([np.fromfile(out / s["file"], dtype=np.uint16) for s in meta["val"]])
    docs = bytes(train.astype(np.uint8) * (train != 256)).split(b"\x00")
    assert meta["documents"] == 2 and (train == 256).sum() == 2 and (val == 256).sum() == 1
    assert docs[0] == "".join(rows["train"][:4]).encode() and docs[1] == "".join(rows["train"][4:]).encode()


def test_max_tokens_stops_tokenising(tmp_path):
    data = _corpus(tmp_path)
    data.max_tokens, data.val_fraction, data.cache_dir = 300, 0.0, str(tmp_path / "c2")
    meta = json.loads((prepare_data(data) / "meta.json").read_text())
    assert sum(s["tokens"] for s in meta["train"]) == 300 and meta["val"] == []


def test_resuming_a_run_dir_with_a_different_model_or_data_is_refused(tmp_path):
    from seqmix.train.guards import check_resumable
    from seqmix.train.schema import recipe_to_dict

    saved = recipe_to_dict(load_recipe(RECIPES / "tiny.yaml"))
    check_resumable(saved, load_recipe(RECIPES / "tiny.yaml", ["train.steps=400", "log.every=5"]), tmp_path)
    with pytest.raises(RecipeError, match=r"data.seq_len: 256 -> 512.*model.d_model: 128 -> 256"):
        check_resumable(saved, load_recipe(RECIPES / "tiny.yaml", ["model.d_model=256", "data.seq_len=512"]),
                         tmp_path)
