"""Generation: prefill + decode equals a naive full-forward loop for every mixer and hybrids; ragged batches;
sampling (greedy, top-k, top-p, seeds, real vocabulary only); stop tokens; errors; CUDA graphs on GPU."""
import copy

import pytest
import torch

from seqmix.config import ModelConfig
from seqmix.generate import generate
from seqmix.model import build_model
from seqmix.sampling import SamplingParams, sample_next
from seqmix.testing import TOLERANCES

VOCAB = 101  # padded to 104: the tail must never be sampled
N_NEW = 8
# Lengths 1, 5, 9 (twice) and 13: distinct lengths and a repeated one; swa:4 and conv wrap their windows.
PROMPTS = [[3, 1, 4, 1, 5], [9], [2, 6, 5, 3, 5, 8, 9, 7, 9], [8, 4, 6, 2, 6, 4, 3, 3, 8, 3, 2, 7, 9],
           [1, 6, 1, 8, 0, 3, 3, 9, 8]]

MIXERS = ["based:feature_dim=4", "based:quadratic:4", "swa:4", "attn:4:2", "mamba:d_state=4", "conv", "mlp"]
HYBRIDS = ["based,swa:8,mlp", "attn,mamba,conv,mlp", "conv,mlp,based:recurrent:4,mlp,swa:3,mlp",
           "based:feature_dim=4,conv:4,attn,swa:6,mamba:d_state=4,mlp"]


def tiny_model(spec: str, dtype=torch.float32, max_seqlen: int = 64, seed: int = 0):
    """Untied head and a large init so the continuation depends on the whole context, not the last token."""
    torch.manual_seed(seed)
    cfg = ModelConfig(spec=spec, d_model=32, n_heads=4, vocab_size=VOCAB, max_seqlen=max_seqlen, init_std=0.3,
                      tie_embeddings=False)
    return build_model(cfg, dtype=dtype).eval()


@torch.no_grad()
def naive_greedy(model, prompt: list[int], n: int) -> list[int]:
    """The definition: recompute the full forward over the whole sequence for every new token."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


@torch.no_grad()
def assert_greedy_tokens(model, prompt: list[int], got: list[int], dtype) -> None:
    """Every generated token is the argmax of one full forward over prompt + the tokens before it; in bf16 a
    different choice is accepted only where the top logits are within the dtype's tolerance (a near tie)."""
    logits_TV = model(torch.tensor([prompt + got[:-1]]))[0, len(prompt) - 1:].float()
    scale = logits_TV.abs().max()
    for i, t in enumerate(got):
        best = logits_TV[i].max()
        assert best - logits_TV[i, t] <= TOLERANCES[dtype] * scale, (
            f"step {i}: generated {t} (logit {logits_TV[i, t]:.4f}) but the full forward prefers "
            f"{int(logits_TV[i].argmax())} (logit {best:.4f})")


@pytest.mark.parametrize("spec", MIXERS + HYBRIDS)
def test_greedy_generate_equals_naive_loop_batch_and_single(spec):
    model = tiny_model(spec)
    batch = model.generate(PROMPTS, max_new_tokens=N_NEW, temperature=0)
    assert batch.shape == (len(PROMPTS), N_NEW) and batch.dtype == torch.int64
    for b, prompt in enumerate(PROMPTS):
        expected = naive_greedy(model, prompt, N_NEW)
        assert batch[b].tolist() == expected, f"sequence {b} in a ragged batch"
    single = model.generate(PROMPTS[3], max_new_tokens=N_NEW, temperature=0)
    assert single[0].tolist() == naive_greedy(model, PROMPTS[3], N_NEW), "single prompt"


def test_continuations_depend_on_the_whole_context():
    """Guards the test model: prompts 2 and 4 share their last token, so a copy-the-last-token model fails."""
    model = tiny_model("based,swa:8,mlp")
    out = model.generate([PROMPTS[2], PROMPTS[4]], max_new_tokens=N_NEW, temperature=0)
    assert out[0].tolist() != out[1].tolist()


@pytest.mark.parametrize("spec", ["attn:4:2,swa:3,mlp", "based:feature_dim=4,conv,mamba:d_state=4"])
def test_left_padded_tensor_equals_ragged_list_whatever_the_padding(spec):
    model = tiny_model(spec)
    T = max(map(len, PROMPTS))
    ids = torch.randint(0, VOCAB, (len(PROMPTS), T))  # padding positions hold arbitrary ids
    mask = torch.zeros(len(PROMPTS), T, dtype=torch.long)
    for b, p in enumerate(PROMPTS):
        ids[b, T - len(p):] = torch.tensor(p)
        mask[b, T - len(p):] = 1
    padded = model.generate(ids, attention_mask=mask, max_new_tokens=N_NEW, temperature=0)
    assert torch.equal(padded, model.generate(PROMPTS, max_new_tokens=N_NEW, temperature=0))
    ids2 = torch.where(mask.bool(), ids, (ids + 17) % VOCAB)
    assert torch.equal(padded, model.generate(ids2, attention_mask=mask, max_new_tokens=N_NEW, temperature=0))


def test_chunked_prefill_gives_the_same_tokens():
    model = tiny_model("based:feature_dim=4,attn,swa:3,conv,mamba:d_state=4")
    full = model.generate(PROMPTS, max_new_tokens=N_NEW, temperature=0)
    assert torch.equal(model.generate(PROMPTS, max_new_tokens=N_NEW, temperature=0, prefill_tokens=4), full)


def test_bf16_greedy_tokens_are_argmax_of_the_full_forward():
    model = tiny_model("based,swa:4,attn,mamba:d_state=4,conv,mlp", dtype=torch.bfloat16)
    out = model.generate(PROMPTS, max_new_tokens=N_NEW, temperature=0)
    for b, prompt in enumerate(PROMPTS):
        assert_greedy_tokens(model, prompt, out[b].tolist(), torch.bfloat16)


def test_attn_cache_holds_prompt_plus_new_tokens_exactly():
    model = tiny_model("attn,mlp", max_seqlen=16)
    prompt = list(range(10))
    out = model.generate(prompt, max_new_tokens=6, temperature=0)  # 10 + 6 = max_seqlen: fits
    assert out[0].tolist() == naive_greedy(model, prompt, 6)
    with pytest.raises(ValueError, match=r"10 tokens \+ max_new_tokens=7 = 17 .* 16 .*max_seqlen"):
        model.generate(prompt, max_new_tokens=7)


def test_recurrent_models_are_not_limited_by_max_seqlen():
    model = tiny_model("based:feature_dim=4,swa:3,mlp", max_seqlen=8)
    assert model.generate(list(range(12)), max_new_tokens=6, temperature=0).shape == (1, 6)


# -- sampling ---------------------------------------------------------------------------------------
def test_top_k_1_and_tiny_top_p_are_greedy():
    model = tiny_model("based:feature_dim=4,swa:4,mlp")
    greedy = model.generate(PROMPTS, max_new_tokens=N_NEW, temperature=0)
    assert torch.equal(model.generate(PROMPTS, max_new_tokens=N_NEW, temperature=1.0, top_k=1, seed=1), greedy)
    assert torch.equal(model.generate(PROMPTS, max_new_tokens=N_NEW, temperature=1.0, top_p=1e-6, seed=1), greedy)


def test_seeds_are_reproducible_and_matter():
    model = tiny_model("conv,mlp")
    kw = dict(max_new_tokens=16, temperature=1.5, top_p=0.95)
    a, b = model.generate(PROMPTS, seed=7, **kw), model.generate(PROMPTS, seed=7, **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, model.generate(PROMPTS, seed=8, **kw))
    assert not torch.equal(a, model.generate(PROMPTS, max_new_tokens=16, temperature=0))


def test_never_samples_the_padded_vocabulary_tail():
    model = tiny_model("conv,mlp")
    with torch.no_grad():
        model.lm_head.weight[VOCAB:] = 50.0  # the 3 padding rows would win every draw if they were visible
    out = model.generate(PROMPTS, max_new_tokens=32, temperature=2.0, seed=0)
    assert int(out.max()) < VOCAB and int(out.min()) >= 0


def test_sample_next_follows_the_softmax_and_its_filters():
    g = torch.Generator().manual_seed(0)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(20000, 4)
    freq = torch.bincount(sample_next(logits, SamplingParams(1.0), g), minlength=4).float() / 20000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.015), freq
    hot = torch.bincount(sample_next(logits, SamplingParams(0.5), g), minlength=4).float() / 20000
    p = torch.tensor([0.5, 0.3, 0.15, 0.05]) ** 2
    assert torch.allclose(hot, p / p.sum(), atol=0.015), hot  # temperature 0.5 squares the probabilities
    assert set(sample_next(logits, SamplingParams(1.0, top_k=2), g).tolist()) == {0, 1}
    assert set(sample_next(logits, SamplingParams(1.0, top_p=0.8), g).tolist()) == {0, 1}  # 0.5 + 0.3 reach 0.8
    assert set(sample_next(logits, SamplingParams(1.0, top_p=0.81), g).tolist()) == {0, 1, 2}


# -- stopping, streaming ----------------------------------------------------------------------------
def test_eos_finishes_a_sequence_and_all_finished_stops_early():
    model = tiny_model("based:feature_dim=4,swa:4,mlp")
    free = model.generate(PROMPTS, max_new_tokens=N_NEW, temperature=0)
    eos = int(free[0, 2])
    out = model.generate(PROMPTS, max_new_tokens=N_NEW, temperature=0, eos_token_id=[eos], pad_token_id=-1)
    for b in range(len(PROMPTS)):
        row = free[b].tolist()
        n = row.index(eos) + 1 if eos in row else N_NEW
        assert out[b, :n].tolist() == row[:n] and (out[b, n:] == -1).all()
    alone = model.generate(PROMPTS[0], max_new_tokens=N_NEW, temperature=0, eos_token_id=eos)
    assert alone[0].tolist() == free[0, :3].tolist()  # stopped after the eos, nothing padded


def test_callback_streams_every_token_in_order():
    model = tiny_model("conv,mlp")
    seen = []
    out = model.generate(PROMPTS, max_new_tokens=5, temperature=0, callback=lambda i, t: seen.append((i, t.clone())))
    assert [i for i, _ in seen] == list(range(5))
    assert torch.equal(torch.stack([t for _, t in seen], 1), out)


def test_zero_new_tokens():
    assert tiny_model("mlp").generate(PROMPTS, max_new_tokens=0).shape == (len(PROMPTS), 0)


# -- errors -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(input_ids=[]), "no prompts"),
    (dict(input_ids=[[1, 2], []]), "prompt 1 is empty"),
    (dict(input_ids=torch.ones(2, 3, dtype=torch.long), attention_mask=torch.tensor([[0, 1, 1], [0, 0, 0]])),
     "prompt 1 is empty"),
    (dict(input_ids=torch.ones(1, 3, dtype=torch.long), attention_mask=torch.tensor([[1, 1, 0]])), "left"),
    (dict(input_ids=[[1, VOCAB]]), f"token id {VOCAB} outside the vocabulary"),
    (dict(input_ids=[[1, 2]], max_new_tokens=-1), "max_new_tokens must be an integer >= 0"),
    (dict(input_ids=[[1, 2]], top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(input_ids=[[1, 2]], top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(input_ids=[[1, 2]], top_k=-1), "top_k must be an integer >= 0"),
    (dict(input_ids=[[1, 2]], temperature=-0.5), "temperature must be >= 0"),
    (dict(input_ids=[list(range(60))], max_new_tokens=8), "exceeds the 64 this model supports"),
])
def test_bad_input_gets_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(tiny_model("attn,mlp"), **kwargs)


# -- a compiled decode step ---------------------------------------------------------------------------
def test_compiled_step_matches_the_eager_step():
    """torch.compile of the whole step (one graph on the reference path): the same logits step by step and the
    same tokens from generate."""
    from seqmix.generate import DecodeStep

    model = tiny_model("based:feature_dim=4,conv:4,attn:4:2,swa:6,mlp")
    with torch.inference_mode():
        explained = torch._dynamo.explain(model.step)(torch.tensor([1, 2]), model.init_states(2, 16))
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
        eager, compiled = DecodeStep(model, 2, 16), DecodeStep(model, 2, 16, compile=True)
        for t in range(6):
            tok = torch.tensor([3 + t, 40 - t])
            torch.testing.assert_close(compiled(tok), eager(tok), rtol=1e-5, atol=1e-5)
    want = model.generate(PROMPTS, max_new_tokens=N_NEW, temperature=0)
    assert torch.equal(model.generate(PROMPTS, max_new_tokens=N_NEW, temperature=0, compile=True), want)


# -- CUDA graphs ------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_graph_tokens_equal_eager(dtype):
    from seqmix.generate import clear_decode_cache

    model = tiny_model("based:feature_dim=4,conv:4,attn:4:2,swa:6,mamba:d_state=4,mlp", dtype=dtype).cuda()
    for kw in (dict(temperature=0), dict(temperature=1.0, top_k=20, top_p=0.9, seed=3)):
        eager = model.generate(PROMPTS, max_new_tokens=N_NEW, cuda_graph=False, **kw)
        graphed = model.generate(PROMPTS, max_new_tokens=N_NEW, cuda_graph=True, **kw)
        again = model.generate(PROMPTS, max_new_tokens=N_NEW, cuda_graph=True, **kw)  # the cached graph
        assert torch.equal(eager, graphed) and torch.equal(graphed, again), kw
        if dtype == torch.float32:  # a compiled step inside the graph (bf16 fusion may round differently)
            assert torch.equal(model.generate(PROMPTS, max_new_tokens=N_NEW, cuda_graph=True, compile=True, **kw),
                               eager), kw
    if dtype == torch.float32:
        # built on a GPU machine, auto picks the kernels, which refuse CPU tensors: ask for the references
        cpu = tiny_model("based:linear:feature_dim=4,conv:4:impl=reference,attn:4:2,swa:6:impl=reference,"
                         "mamba:d_state=4:conv_impl=reference,mlp")
        for b, p in enumerate(PROMPTS):
            assert_greedy_tokens(cpu, p, model.generate(p, max_new_tokens=N_NEW, temperature=0)[0].tolist(),
                                 torch.float32)
    clear_decode_cache()


# -- the CLI ----------------------------------------------------------------------------------------
def cli(*args):
    from click.testing import CliRunner

    from seqmix.cli import main

    return CliRunner().invoke(main, ["generate", *args])


def test_cli_streams_the_same_text_as_the_api_from_a_saved_model(tmp_path):
    from seqmix.io import save
    from seqmix.tokenizer import get_tokenizer, save_tokenizer_config

    tok = get_tokenizer("bytes")
    torch.manual_seed(0)
    model = build_model(ModelConfig(spec="based:feature_dim=4,swa:4,mlp", d_model=32, n_heads=4,
                                    vocab_size=tok.vocab_size, init_std=0.3, tie_embeddings=False))
    d = save(model, tmp_path / "m")
    save_tokenizer_config(d, "bytes")  # the directory records its tokenizer; the CLI must pick it up
    r = cli(str(d), "--prompt", "héllo", "--max-new-tokens", "12", "--temperature", "0")
    assert r.exit_code == 0, r.output
    ids = model.generate(tok.encode("héllo"), max_new_tokens=12, temperature=0, eos_token_id=tok.eos_id)[0]
    assert r.stdout == "héllo" + tok.decode(ids.tolist()) + "\n"
    assert "tokens/s" in r.output


def test_cli_random_weights_from_a_spec_and_seeded_sampling():
    args = ["conv,mlp", "--d-model", "32", "--heads", "2", "--tokenizer", "bytes", "--prompt", "abc",
            "--max-new-tokens", "8", "--seed", "3"]
    a, b = cli(*args), cli(*args)
    assert a.exit_code == 0, a.output
    assert a.stdout.startswith("abc") and a.stdout == b.stdout


@pytest.mark.parametrize("args,needle", [
    (["--prompt", ""], "prompt is empty"),
    (["--prompt", "hi", "--max-new-tokens", "-1"], "max_new_tokens"),
    (["--prompt", "hi", "--top-p", "0"], "top_p"),
    (["--prompt", "hi", "--top-k", "-2"], "top_k"),
    (["--prompt", "hi", "--max-new-tokens", "5000"], "max_seqlen"),
])
def test_cli_bad_arguments_exit_2_with_one_line_and_no_output(args, needle):
    r = cli("attn,mlp", "--d-model", "32", "--heads", "2", "--tokenizer", "bytes", *args)
    assert r.exit_code == 2 and needle in r.output and "Traceback" not in r.output
    assert r.stdout == ""  # nothing (not even the prompt) is printed before the error


def test_bench_generate_quick_writes_the_table(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "kernels" / "bench" / "bench_generate.py"
    spec = importlib.util.spec_from_file_location("bench_generate", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "gen.md"
    table = bench.main(["--quick", "--model", "based:feature_dim=4,swa:4,mlp", "--model", "attn,mlp",
                        "--d-model", "32", "--heads", "4", "--out", str(out)])
    assert out.read_text() == table
    rows = [line.split("|") for line in table.splitlines() if line.startswith("| based") or line.startswith("| attn")]
    assert [(r[1].strip(), r[2].strip()) for r in rows[:4]] == [
        ("based:feature_dim=4,s...", "1"), ("based:feature_dim=4,s...", "2"), ("attn,mlp", "1"), ("attn,mlp", "2")]
    assert all(float(r[4].replace(",", "")) > 0 for r in rows[:4])  # decode tokens/s
    assert "step / floor" in table and "Peak decode throughput" in table


def test_bench_generate_llama_peer_has_the_attention_models_shape(tmp_path):
    """The transformers peer is built from the seqmix (attn, mlp) * N model's sizes: the same parameter count."""
    import importlib.util
    import sys
    from pathlib import Path

    bench_dir = Path(__file__).parents[1] / "kernels" / "bench"
    sys.path.insert(0, str(bench_dir))
    try:
        import hf_peer
    finally:
        sys.path.remove(str(bench_dir))
    model = tiny_model("(attn:heads=4:kv_heads=2,mlp:96)*2")
    shape = hf_peer.llama_shape_of(model)
    assert (shape["num_hidden_layers"], shape["num_key_value_heads"], shape["intermediate_size"]) == (2, 2, 96)
    llm = hf_peer.build_llama(shape, "cpu", torch.float32)
    assert sum(p.numel() for p in llm.parameters()) == model.num_params()
    with pytest.raises(ValueError, match=r"\(attn, mlp\) \* N"):
        hf_peer.llama_shape_of(tiny_model("based,mlp"))
    path = bench_dir / "bench_generate.py"
    spec = importlib.util.spec_from_file_location("bench_generate", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    table = bench.main(["--quick", "--model", "attn,mlp", "--peer-of", "(attn,mlp)*2", "--d-model", "32", "--heads",
                        "4", "--llama", "eager", "--out", str(tmp_path / "gen.md")])
    assert "| transformers Llama, eager | 2 |" in table and "attn,mlp / transformers Llama, eager" in table


# -- prefill: each sequence's first chunk through Mixer.prefill ---------------------------------------------
def _spy_prefill(model, calls: list):
    """Record (block, tokens) of every Mixer.prefill and every forward that continues a state."""
    for i, block in enumerate(model.blocks):
        mixer = block.mixer
        real_prefill, real_forward = mixer.prefill, mixer.forward

        def prefill(x_BTD, state, _i=i, _f=real_prefill):
            calls.append(("prefill", _i, x_BTD.shape[1]))
            return _f(x_BTD, state)

        def forward(x_BTD, *, state=None, return_state=False, _i=i, _f=real_forward):
            if state is not None:
                calls.append(("continue", _i, x_BTD.shape[1]))
            return _f(x_BTD, state=state, return_state=return_state)

        mixer.prefill, mixer.forward = prefill, forward


def test_generate_prefills_each_first_chunk_and_continues_the_rest():
    spec = "based:feature_dim=4,swa:4,attn:4:2,mamba:d_state=4,conv,mlp"
    model, calls = tiny_model(spec), []
    want = [naive_greedy(model, p, N_NEW) for p in (PROMPTS[3], PROMPTS[1])]
    _spy_prefill(model, calls)
    got = model.generate([PROMPTS[3], PROMPTS[1]], max_new_tokens=N_NEW, temperature=0, prefill_tokens=6)
    assert got.tolist() == want
    # one group per length (1, then 13); 13 tokens in chunks of 6: 6 prefilled, 6 + 1 continued (the stateless
    # mlp's forward gets no state)
    blocks, stateful = range(len(model.blocks)), range(len(model.blocks) - 1)
    assert calls == ([("prefill", i, 1) for i in blocks] + [("prefill", i, 6) for i in blocks]
                     + [("continue", i, 6) for i in stateful] + [("continue", i, 1) for i in stateful])


def test_hf_forward_prefills_a_fresh_cache():
    import transformers  # noqa: F401  (make install-test installs it)
    from seqmix.hf import SeqmixForCausalLM

    model, calls = tiny_model("swa:4,attn:4:2,mlp"), []
    want = naive_greedy(model, PROMPTS[2], N_NEW)
    _spy_prefill(model, calls)
    hf = SeqmixForCausalLM.from_hybrid(model).eval()
    out = hf.generate(torch.tensor([PROMPTS[2]]), max_new_tokens=N_NEW, do_sample=False)
    assert out[0, len(PROMPTS[2]):].tolist() == want
    assert calls == [("prefill", i, len(PROMPTS[2])) for i in range(3)]  # then decode steps only


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_prefill_takes_the_swa_kernel_and_the_causal_fast_path(monkeypatch):
    """On a GPU, generate's prefill runs swa's banded Triton kernel and attn's is_causal SDPA (no mask)."""
    import torch.nn.functional as F

    model = tiny_model("swa:4,attn:4:2,mlp").cuda()
    cpu = copy.deepcopy(model).cpu()  # the references, to check the tokens against (a move re-resolves auto)
    assert cpu.blocks[0].mixer.impl == "reference"
    swa = model.blocks[0].mixer
    assert swa.impl == "triton"
    seen = []
    kernel = swa.ops["impl"].fresh
    swa.ops["impl"] = swa.ops["impl"]._replace(
        fresh=lambda q, k, v, w: seen.append(("swa kernel", q.shape[1])) or kernel(q, k, v, w))
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, **kw):
        if is_causal:
            seen.append(("causal sdpa", q.shape[2]))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    got = model.generate([PROMPTS[3]], max_new_tokens=N_NEW, temperature=0, cuda_graph=False)
    assert seen == [("swa kernel", len(PROMPTS[3])), ("causal sdpa", len(PROMPTS[3]))]
    assert_greedy_tokens(cpu, PROMPTS[3], got[0].tolist(), torch.float32)


@pytest.mark.parametrize("temperature", [1e-45, 1e-300, 1e-38, 1e-30])
def test_a_tiny_temperature_is_greedy_not_token_zero(temperature):
    model = tiny_model("based,swa:8,mlp")
    greedy = model.generate(PROMPTS, max_new_tokens=N_NEW, temperature=0)
    assert torch.equal(model.generate(PROMPTS, max_new_tokens=N_NEW, temperature=temperature, seed=3), greedy)
    logits = torch.tensor([[0.0, 5.0, 5.0 - 1e-6, 1.0]])  # a near tie: only the maximum may be drawn
    assert sample_next(logits, SamplingParams(temperature), torch.Generator().manual_seed(0)).item() == 1


@pytest.mark.parametrize("where", ["weights", "late"])
@pytest.mark.parametrize("streaming", [False, True])  # a callback makes the loop check before every token
def test_non_finite_logits_stop_generation_with_a_message(where, streaming):
    from seqmix.generate import NonFiniteLogitsError

    model = tiny_model("mamba:d_state=4,mlp")
    if where == "weights":  # a NaN weight: the logits of every prompt are NaN from the first token on
        with torch.no_grad():
            model.blocks[1].mixer.fc2.weight[0, 0] = float("nan")
        needle, emitted = "new token 0 of sequence 0 (5 of 5 sequences", []
    else:  # sequence 2's logits become infinite at the third decode step (new token 3)
        real, calls = model.step, []

        def step(token_B, states):
            logits_BV, states = real(token_B, states)
            calls.append(1)
            return (logits_BV.index_fill(0, torch.tensor([2]), float("inf")) if len(calls) >= 3 else logits_BV,
                    states)

        model.step = step
        needle, emitted = "new token 3 of sequence 2 (1 of 5 sequences", [0, 1, 2]
    seen = []
    with pytest.raises(NonFiniteLogitsError, match=needle.replace("(", r"\(")) as info:
        model.generate(PROMPTS, max_new_tokens=N_NEW, temperature=0.7, seed=0,
                       callback=(lambda i, t: seen.append(i)) if streaming else None)
    assert "NaN or infinite" in str(info.value) and "instead of emitting" in str(info.value)
    assert seen == (emitted if streaming else [])  # streaming stops before the first bad token is shown
