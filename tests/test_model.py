"""HybridLM: named architectures, parameter counts, block layout, hybrid conformance, save/load."""
import pytest
import torch

from seqmix.io import load, save
from seqmix.config import NAMED_ARCHS, ModelConfig, resolve_model
from seqmix.model import build_model
from seqmix.spec import parse_spec
from seqmix.testing import check_model_conformance

PUBLISHED_PARAMS = {"based-360m": 362_620_928, "based-1b": 1_349_453_056, "attn-360m": 359_810_048}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_published_parameter_counts(name):
    model = build_model(resolve_model(name), device="meta")
    assert model.num_params() == PUBLISHED_PARAMS[name]


@pytest.mark.parametrize("name", sorted(NAMED_ARCHS))
def test_every_named_architecture_builds_on_meta(name):
    model = build_model(resolve_model(name), device="meta")
    assert model.num_params() > 100_000_000
    assert model.flops_per_token(2048) > 2 * model.num_params() * 0.5


def test_based_360m_layout_matches_the_published_layer_positions():
    layers = parse_spec(resolve_model("based-360m").spec)
    mixers = [l.name for l in layers[0::2]]  # every other block is the MLP
    assert all(l.name == "mlp" for l in layers[1::2]) and len(mixers) == 27
    assert [i for i, m in enumerate(mixers) if m == "based"] == [1, 6, 11, 16, 21]
    assert [i for i, m in enumerate(mixers) if m == "swa"] == [2, 7, 12, 17, 22]
    assert mixers.count("conv") == 17
    assert all(l.kwargs == {"window": 129} for l in layers if l.name == "swa")


def test_based_1b_layout():
    mixers = [l.name for l in parse_spec(resolve_model("based-1b").spec)[0::2]]
    assert [i for i, m in enumerate(mixers) if m == "based"] == [1, 6, 11, 16, 21, 27, 33]
    assert [i for i, m in enumerate(mixers) if m == "swa"] == [2, 7, 12, 17, 22, 28, 34]
    assert mixers.count("conv") == 22


def test_vocab_is_padded_and_logits_cover_only_the_real_vocab():
    cfg = ModelConfig(spec="conv,mlp", d_model=16, n_heads=2, vocab_size=101)
    assert cfg.padded_vocab_size == 104
    model = build_model(cfg)
    assert model.embed.weight.shape[0] == 104
    assert model(torch.zeros(2, 5, dtype=torch.long)).shape == (2, 5, 101)


def test_residual_stream_is_fp32_in_a_bf16_model():
    model = build_model(ModelConfig(spec="conv,mlp", d_model=16, n_heads=2, vocab_size=64), dtype=torch.bfloat16)
    h = model.hidden(torch.zeros(1, 3, dtype=torch.long))
    assert h.dtype == torch.bfloat16
    x = model.embed(torch.zeros(1, 3, dtype=torch.long)).float()
    out, residual = model.blocks[0](None, x)
    assert residual.dtype == torch.float32 and out.dtype == torch.bfloat16


HYBRIDS = [
    "based,swa:7,mlp",
    "conv,mlp,based:linear,mlp,swa:5,mlp",
    "(conv,mlp,based,mlp)*2",
    "attn:heads=4:kv_heads=2,mlp,mamba:d_state=8",
    "based:quadratic:8:2,conv:4,attn,swa:16,mamba,mlp",
]


@pytest.mark.parametrize("spec", HYBRIDS)
def test_hybrid_stack_conformance_fp32(spec):
    check_model_conformance(spec, dtype=torch.float32)


def test_hybrid_stack_conformance_bf16():
    check_model_conformance("based,conv,attn,swa:9,mamba,mlp", dtype=torch.bfloat16)


def test_loss_is_near_uniform_at_init_and_finite_gradients():
    cfg = ModelConfig(spec="based,swa:8,mlp", d_model=32, n_heads=4, vocab_size=97)
    model = build_model(cfg)
    tokens = torch.randint(0, 97, (3, 33))
    loss = model.loss(tokens[:, :-1], tokens[:, 1:])
    assert abs(loss.item() - torch.log(torch.tensor(97.0)).item()) < 0.5
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_save_and_load_roundtrip_gives_identical_logits(tmp_path):
    cfg = resolve_model("based,swa:8,conv,attn,mamba,mlp", d_model=32, n_heads=4, vocab_size=97)
    model = build_model(cfg)
    tokens = torch.randint(0, 97, (2, 19))
    out = save(model, tmp_path / "m")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    again = load(tmp_path / "m")
    assert again.config == cfg
    assert torch.equal(again(tokens), model(tokens))
    save(again, tmp_path / "m")  # overwriting an existing directory works and leaves no temp dirs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_load_names_missing_and_unexpected_keys(tmp_path):
    from safetensors.torch import load_file, save_file

    model = build_model(resolve_model("conv,mlp", d_model=16, n_heads=2, vocab_size=64))
    d = save(model, tmp_path / "m")
    t = load_file(str(d / "model.safetensors"))
    t["extra.weight"] = t.pop("blocks.0.mixer.out_proj.weight")
    save_file(t, str(d / "model.safetensors"))
    with pytest.raises(ValueError,
                       match=r"(?s)missing keys: \['blocks.0.mixer.out_proj.weight'\].*unexpected keys: \['extra.weight'\]"):
        load(d)


@pytest.mark.parametrize("spec,layers", [
    ("based:linear,swa:64,conv", None),
    ("based,swa64,mlp", 36),
    ("(conv,mlp,based,mlp)*4", None),
    ("attn:heads=16:kv_heads=4,mlp", None),
    ("mamba:d_state=16", None),
])
def test_design_examples_build_with_the_installed_plugins(spec, layers):
    cfg = resolve_model(spec, layers=layers, d_model=256, n_heads=16)
    model = build_model(cfg, device="meta")
    assert len(model.blocks) == (layers or len(parse_spec(spec)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_hybrid_stack_conformance_on_cuda_with_kernels(dtype):
    """Every kernel path that auto picks on a GPU (based parallel, swa and conv Triton) inside one model."""
    model = check_model_conformance("based,swa:16,conv,attn,mamba,mlp", dtype=dtype, device="cuda", d_model=64)
    impls = {b.mixer.name: getattr(b.mixer, "impl", None) for b in model.blocks}
    assert impls["based"] == "parallel" and impls["swa"] == "triton" and impls["conv"] == "triton"


def test_auto_kernels_are_re_resolved_when_the_model_moves(monkeypatch):
    """`auto` resolves against the layer's device: a model placed where CUDA is visible (meta: not yet placed,
    so this machine's device) takes the kernels; moved to the CPU (`to_empty`, as `.to("cpu")` would) every auto
    layer re-resolves to its reference twin and gives what a model built on a CPU machine gives. No call-time
    branch: explicit kernel names stay kernels."""
    import triton  # noqa: F401  (make install-test installs it)
    spec = "based,swa:5,conv,mamba,mlp"
    cfg = resolve_model(spec, d_model=64, n_heads=4, vocab_size=97)
    cpu_built = build_model(cfg).eval()
    assert all(b.mixer.impl in ("linear", "reference", "chunked") for b in cpu_built.blocks)
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: True)
        m.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
        gpu_built = build_model(cfg, device="meta").eval()
        impls = {b.mixer.name: b.mixer.impl for b in gpu_built.blocks}
        assert impls["based"] == "parallel" and impls["swa"] == "triton" and impls["conv"] == "triton"
        assert gpu_built.blocks[3].mixer.conv_impl == "triton"
        gpu_built.to_empty(device="cpu")  # the move re-resolves, on a machine that still sees CUDA
    impls = {b.mixer.name: b.mixer.impl for b in gpu_built.blocks}
    assert impls == {"based": "linear", "swa": "reference", "conv": "reference", "mamba": "chunked",
                     "mlp": "reference"}
    assert gpu_built.blocks[3].mixer.conv_impl == "reference"
    gpu_built.load_state_dict(cpu_built.state_dict())
    ids = torch.randint(0, 97, (3, 21))
    with torch.no_grad():
        want = cpu_built(ids)
        assert torch.equal(gpu_built(ids), want)
        states = gpu_built.init_states(3, 32)
        _, states = gpu_built(ids[:, :-1], states, return_states=True)
        logits, _ = gpu_built.step(ids[:, -1], states)
    torch.testing.assert_close(logits, want[:, -1], rtol=1e-4, atol=1e-4)
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: True)
        m.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
        explicit = build_model(resolve_model("based:parallel,mlp", d_model=64, n_heads=4, vocab_size=97))
    with pytest.raises((RuntimeError, ValueError), match="(?i)cuda"):
        explicit(ids)


def test_the_spec_is_parsed_once_and_every_logit_comes_from_one_head(monkeypatch):
    import seqmix.spec

    parsed, heads = [], []
    real_parse = seqmix.spec.parse_spec
    monkeypatch.setattr(seqmix.spec, "parse_spec", lambda text, *a, **k: parsed.append(text) or real_parse(text, *a, **k))
    cfg = resolve_model("conv,(based,mlp)*2", d_model=32, n_heads=4, vocab_size=61)
    model = build_model(cfg).eval()
    assert parsed == ["conv,(based,mlp)*2"]  # resolve_model's parse is kept with the config: HybridLM reuses it
    assert cfg.layers() == model.layer_specs and len(model.blocks) == 5
    loaded = type(cfg).from_dict(cfg.to_dict())  # config.json holds the canonical string only
    assert "_layers" not in cfg.to_dict() and loaded.layers() == cfg.layers() and len(parsed) == 2
    real_logits = model.logits
    monkeypatch.setattr(model, "logits", lambda h: heads.append(tuple(h.shape)) or real_logits(h))
    ids = torch.randint(0, 61, (2, 5))
    with torch.no_grad():
        model(ids)
        model.step(ids[:, 0], model.init_states(2, 8))
        model.generate(ids, max_new_tokens=2, temperature=0)
    assert heads == [(2, 5, 32), (2, 32), (2, 32), (2, 32)]  # forward, step, generate's prefill and one step
