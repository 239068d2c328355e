"""transformers integration: a seqmix directory loads through AutoModelForCausalLM and transformers' generate runs it."""
import json

import pytest
import torch

import transformers

import seqmix.hf  # noqa: E402,F401  (registers model_type "seqmix")
from seqmix.config import resolve_model  # noqa: E402
from seqmix.hf import SeqmixCache, SeqmixConfig, SeqmixForCausalLM  # noqa: E402
from seqmix.io import load, save  # noqa: E402
from seqmix.model import build_model  # noqa: E402
from seqmix.testing import assert_close  # noqa: E402

SPEC = "based,swa:5,attn,mamba,conv,mlp"  # all six mixers
VOCAB, B, T, NEW = 101, 3, 63, 9


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(the HybridLM, its saved directory); weights scaled up so that every block matters."""
    torch.manual_seed(0)
    model = build_model(resolve_model(SPEC, d_model=64, n_heads=4, vocab_size=VOCAB, max_seqlen=128)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return model, save(model, tmp_path_factory.mktemp("hf") / "m")


@pytest.fixture(scope="module")
def auto(saved):
    return transformers.AutoModelForCausalLM.from_pretrained(saved[1]).eval()


def tokens(b=B, t=T, seed=1):
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def left_padded(lengths, seed=2):
    rows = [tokens(1, n, seed + i)[0] for i, n in enumerate(lengths)]
    width = max(lengths)
    ids = torch.zeros(len(rows), width, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    return rows, ids, mask


def test_auto_classes_load_a_seqmix_directory(saved, auto):
    model, path = saved
    config = transformers.AutoConfig.from_pretrained(path)
    assert isinstance(config, SeqmixConfig) and config.spec == model.config.spec
    assert config.to_model_config() == model.config
    import dataclasses

    from seqmix.config import ModelConfig

    fields = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    assert {k: getattr(SeqmixConfig(), k) for k in fields if k != "spec"} == {k: v for k, v in fields.items() if k != "spec"}
    assert isinstance(auto, SeqmixForCausalLM)
    ids = tokens()
    with torch.no_grad():
        want, got = model(ids), auto(ids).logits
    assert torch.equal(got, want)  # the same HybridLM code on the same weights


def test_loss_matches_hybrid_lm(saved, auto):
    ids = tokens()
    with torch.no_grad():
        want = saved[0].loss(ids[:, :-1], ids[:, 1:])
        got = auto(ids, labels=ids).loss
    assert_close(got, want, torch.float32, "loss")


def test_greedy_generate_matches_seqmix_generate(saved, auto):
    ids = tokens()
    out = auto.generate(ids, max_new_tokens=NEW, do_sample=False)
    assert out.shape == (B, T + NEW) and torch.equal(out[:, :T], ids)
    assert torch.equal(out[:, T:], saved[0].generate(ids, max_new_tokens=NEW, temperature=0))


def test_cache_equals_full_recompute(auto):
    """use_cache=False re-runs the whole sequence each step; the cached run must pick the same tokens, for
    greedy, sampling with a seed, and beam search (which reorders the cache rows every step)."""
    ids = tokens(t=20)
    for kw in (dict(do_sample=False), dict(do_sample=True, top_k=20), dict(num_beams=3, do_sample=False)):
        torch.manual_seed(5)
        cached = auto.generate(ids, max_new_tokens=NEW, **kw)
        torch.manual_seed(5)
        full = auto.generate(ids, max_new_tokens=NEW, use_cache=False, **kw)
        assert torch.equal(cached, full), kw


def test_left_padded_batch_equals_each_prompt_alone(saved, auto):
    rows, ids, mask = left_padded([5, 17, 11])
    out = auto.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    for i, r in enumerate(rows):
        alone = saved[0].generate(r[None], max_new_tokens=NEW, temperature=0)[0]
        assert torch.equal(out[i, ids.shape[1]:], alone), f"row {i}"
    # without a cache the padded forward is exact too (one unpadded forward per prompt length)
    nocache = auto.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                            use_cache=False)
    assert torch.equal(nocache, out)


def test_right_padding_is_refused(auto):
    _, ids, mask = left_padded([5, 9])
    with pytest.raises(ValueError, match="padding on the left"):
        auto(ids, attention_mask=mask.flip(1))


def test_cache_continues_a_sequence(saved, auto):
    ids = tokens()
    cache = SeqmixCache(auto.model, B, T)
    with torch.no_grad():
        first = auto(ids[:, :40], cache=cache).logits
        rest = auto(ids[:, 40:], cache=cache).logits
        want = saved[0](ids)
    assert cache.get_seq_length() == T
    assert_close(torch.cat([first, rest], 1), want, torch.float32, "chunked through the cache")


def test_cache_reorder_and_bytes(auto):
    cache = SeqmixCache(auto.model, 4, 32)
    allocated = sum(v.numel() * v.element_size() for s in cache.states if s for v in s.values())
    assert allocated == auto.model.state_bytes(4, 32, torch.float32)
    for s in cache.states:
        for v in (s or {}).values():
            v.copy_(torch.arange(4).view(-1, *[1] * (v.dim() - 1)).to(v.dtype).expand_as(v))
    cache.reorder_cache(torch.tensor([2, 2, 0, 3]))
    for s in cache.states:
        for v in (s or {}).values():
            assert v.reshape(4, -1)[:, 0].tolist() == [2, 2, 0, 3]
    assert cache.batch_size == 4 and len(cache) == len(auto.model.blocks)
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        cache.crop(1)


def test_cache_longer_than_the_kv_capacity_is_refused(auto):
    with pytest.raises(ValueError, match="max_seqlen"):
        SeqmixCache(auto.model, 1, auto.config.max_seqlen + 1)


def test_wrapper_save_pretrained_writes_seqmix_format(saved, auto, tmp_path):
    auto.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["model_type"] == "seqmix"
    back = load(tmp_path / "again")
    ids = tokens()
    with torch.no_grad():
        assert torch.equal(back(ids), saved[0](ids))


def test_from_hybrid_shares_parameters(saved):
    wrapped = SeqmixForCausalLM.from_hybrid(saved[0])
    assert wrapped.model is saved[0] and wrapped.config.spec == saved[0].config.spec
    assert wrapped.get_input_embeddings() is saved[0].embed


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_generate_matches_seqmix(saved, dtype):
    """On a GPU (kernels picked by `auto`, decode step CUDA-graphed in the SeqmixCache): transformers' generate
    equals seqmix's CUDA-graph generate, and (fp32) beam search and a left-padded batch equal recomputation."""
    path = saved[1]
    auto = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map="cuda").eval()
    native = load(path, device="cuda", dtype=dtype).eval()
    assert auto.model.embed.weight.dtype == dtype and auto.device.type == "cuda"
    ids = tokens().cuda()
    out = auto.generate(ids, max_new_tokens=NEW, do_sample=False)
    assert torch.equal(out[:, T:], native.generate(ids, max_new_tokens=NEW, temperature=0, cuda_graph=True))
    if dtype == torch.float32:
        beams = dict(max_new_tokens=NEW, num_beams=3, do_sample=False)
        assert torch.equal(auto.generate(ids, **beams), auto.generate(ids, use_cache=False, **beams))
        rows, padded, mask = left_padded([5, 17, 11])
        got = auto.generate(padded.cuda(), attention_mask=mask.cuda(), max_new_tokens=NEW, do_sample=False,
                            pad_token_id=0)
        for i, r in enumerate(rows):
            alone = native.generate(r[None].cuda(), max_new_tokens=NEW, temperature=0)[0]
            assert torch.equal(got[i, padded.shape[1]:], alone), f"row {i}"
