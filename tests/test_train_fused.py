"""The fused training path (Triton block boundaries, rotary, short conv, swa and LM-head loss; compiled blocks)
trains like the PyTorch references: the same loss curve, step for step.

GPU: 200 bf16 steps of a tiny hybrid on the embedded corpus, fused + compiled vs references + eager, to bf16
tolerance. CPU: a few fp32 steps with the Triton kernels under Triton's interpreter (based has no interpreted
path; it runs its reference on both sides), and one compile of every block with fullgraph=True (no graph
break through the custom ops) whose loss and gradients equal the eager ones.
"""
import copy

import numpy as np
import pytest
import torch

from seqmix.config import resolve_model
from seqmix.data import default_corpus_files
from seqmix.model import build_model
from seqmix.train.plain import PlainTrainer
from seqmix_kernels.testing import HAS_CUDA, import_kernel_modules, use_interpreter

import_kernel_modules("seqmix_kernels.rmsnorm.triton", "seqmix_kernels.rotary.triton",
                      "seqmix_kernels.short_conv.triton", "seqmix_kernels.cross_entropy.triton", "seqmix_swa.kernel")
FUSED = "conv:impl=triton,mlp,based,mlp,swa:16:impl=triton,mlp"
REFERENCE = "conv:impl=reference,mlp,based:impl=linear,mlp,swa:16:impl=reference,mlp"


def corpus_batches(steps: int, batch: int, seq_len: int, seed: int = 0):
    """Byte windows of the embedded corpus at seeded offsets: (tokens, next tokens) per step, on the CPU."""
    data = np.frombuffer(b"".join(p.read_bytes() for p in default_corpus_files()), dtype=np.uint8)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        starts = rng.integers(0, len(data) - seq_len - 1, batch)
        w = torch.from_numpy(np.stack([data[s:s + seq_len + 1] for s in starts]).astype(np.int64))
        yield w[:, :-1], w[:, 1:]


def make(spec: str, device: str, dtype, fused: str, d_model: int):
    torch.manual_seed(0)
    model = build_model(resolve_model(spec, d_model=d_model, n_heads=4, vocab_size=256)).to(device)
    model = model.to(dtype)
    model.select_impls(fused=fused)
    return model


def curve(model, steps: int, batch: int, seq_len: int, device: str) -> list[float]:
    trainer = PlainTrainer(model, lr=3e-3, weight_decay=0.1, grad_clip=1.0)
    losses = []
    for x, y in corpus_batches(steps, batch, seq_len):
        x, y = x.to(device), y.to(device)
        losses.append(float(trainer.step(lambda: model.loss(x, y))))
    return losses


def test_fused_path_trains_like_the_references_on_cpu(monkeypatch):
    use_interpreter(monkeypatch)
    if HAS_CUDA:
        pytest.skip("the GPU test below covers this with compiled blocks")
    fused = make(FUSED, "cpu", torch.float32, "triton", 32)
    ref = make(REFERENCE, "cpu", torch.float32, "reference", 32)
    assert fused.fused == "triton" and fused.blocks[0].mixer.impl == "triton"
    a, b = curve(fused, 3, 2, 32, "cpu"), curve(ref, 3, 2, 32, "cpu")
    np.testing.assert_allclose(a, b, rtol=1e-4, err_msg="fused vs reference losses (fp32)")


def test_every_block_compiles_to_one_graph_through_the_custom_ops(monkeypatch):
    use_interpreter(monkeypatch)
    from torch._dynamo.utils import counters

    device = "cuda" if HAS_CUDA else "cpu"
    eager = make(FUSED, device, torch.float32, "triton", 32)
    compiled = copy.deepcopy(eager)
    torch._dynamo.reset()
    counters.clear()
    compiled.compile_blocks(backend="aot_eager", fullgraph=True)  # a graph break would raise
    x, y = next(corpus_batches(1, 2, 24))
    x, y = x.to(device), y.to(device)
    l_eager, l_comp = eager.loss(x, y), compiled.loss(x, y)
    l_eager.backward()
    l_comp.backward()
    torch.testing.assert_close(l_comp, l_eager)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=lambda m: f"{name}: {m}")
    # 6 blocks, 4 graphs: conv, based, swa, and one the 3 mlps share (same mixer and shapes)
    assert counters["stats"]["unique_graphs"] == 4, dict(counters["stats"])
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_200_steps_fused_and_compiled_match_the_references():
    fused = make(FUSED.replace(",based,", ",based:impl=parallel,"), "cuda", torch.bfloat16, "triton", 128)
    fused.compile_blocks()
    ref = make(REFERENCE, "cuda", torch.bfloat16, "reference", 128)
    a = np.array(curve(fused, 200, 8, 256, "cuda"))
    b = np.array(curve(ref, 200, 8, 256, "cuda"))
    assert b[-20:].mean() < b[:5].mean() - 1.0, f"the run did not learn: {b[:5]} ... {b[-5:]}"
    assert abs(a[0] - b[0]) < 0.01 * b[0], (a[0], b[0])  # one forward apart: kernel rounding only
    win_a, win_b = a.reshape(20, 10).mean(1), b.reshape(20, 10).mean(1)  # 10-step means: bf16 noise averages out
    worst = np.abs(win_a - win_b).max()
    assert worst < 0.05, f"10-step mean losses differ by {worst:.4f}\nfused {np.round(win_a, 4)}\nref   {np.round(win_b, 4)}"
