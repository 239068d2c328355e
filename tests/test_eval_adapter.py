"""The lm-eval adapter against code nobody here wrote: lm-eval's own `hf` model on a small random transformers
LlamaForCausalLM, and the `seqmix` model on the same weights converted by `seqmix convert`."""
import os
import subprocess
import sys

import pytest
import torch

import lm_eval
import transformers

from click.testing import CliRunner  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

from seqmix.cli import main  # noqa: E402
from seqmix.eval.lm_eval import SeqmixLM  # noqa: E402
from seqmix.eval.tokenizer import fast_tokenizer  # noqa: E402
from seqmix.tokenizer import get_tokenizer  # noqa: E402

EOS = 50256
TEXTS = ["Hello world <|endoftext|> héllo 日本\n\n  x", "", " leading", "a\tb\r\nc", "~!@#$%^&*()_+" * 3]


def llama(swap: tuple[int, int] = None):
    """A random GPT-2-vocabulary Llama; `swap` exchanges two token ids (embedding and head rows), which maps its
    greedy outputs through the same exchange: a way to make it emit EOS at a chosen step."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=96, vocab_size=50257, rms_norm_eps=1e-6, initializer_range=0.2,
                                   max_position_embeddings=2048, bos_token_id=EOS, eos_token_id=EOS,
                                   pad_token_id=EOS,  # GPT-2's: transformers' generate stops at the config's eos
                                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    model = transformers.LlamaForCausalLM(cfg).eval()
    if swap is not None:
        a, b = swap
        with torch.no_grad():
            for w in (model.model.embed_tokens.weight, model.lm_head.weight):
                w[[a, b]] = w[[b, a]]
    return model


def pair(tmp_path, model, batch_size=3):
    """(lm-eval's hf model on `model`, the seqmix model on its `seqmix convert` copy)."""
    model.save_pretrained(tmp_path / "hf")
    res = CliRunner().invoke(main, ["convert", str(tmp_path / "hf"), str(tmp_path / "sx")])
    assert res.exit_code == 0, res.output
    theirs = HFLM(pretrained=model, tokenizer=fast_tokenizer("gpt2"), batch_size=batch_size, max_length=2048,
                  device="cpu")
    ours = SeqmixLM(str(tmp_path / "sx"), dtype="float32", device="cpu", batch_size=batch_size)
    return theirs, ours


@pytest.mark.parametrize("name", ["gpt2", "bytes"])
def test_the_fast_tokenizer_encodes_and_decodes_as_seqmix_does(name):
    tok, ref = fast_tokenizer(name), get_tokenizer(name)
    for text in TEXTS:
        assert tok.encode(text) == ref.encode(text)
        assert tok.decode(tok.encode(text)) == text
    assert (tok.vocab_size, tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) == (
        ref.vocab_size, ref.eos_id, ref.eos_id, None)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return pair(tmp_path_factory.mktemp("llama"), llama())


def test_loglikelihoods_match_lm_evals_hf_model(models):
    theirs, ours = models
    pairs = [("The cat sat on the", " mat"), ("", "Hello world"), ("Q: 2+2=", " 4\nA"),
             ("A long context " * 200, " end."), ("x", "y z w")]  # the 4th is left-truncated to 2048 tokens
    reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    a, b = ours.loglikelihood(reqs), theirs.loglikelihood(reqs)
    assert [g for _, g in a] == [g for _, g in b]
    assert [x for x, _ in a] == pytest.approx([x for x, _ in b], abs=1e-4, rel=1e-5)
    roll = [Instance("loglikelihood_rolling", {}, ("some text to score, rolling " * 400,), 0)]  # > 2048 tokens
    assert ours.loglikelihood_rolling(roll) == pytest.approx(theirs.loglikelihood_rolling(roll), rel=1e-5)


def test_greedy_generate_until_matches_and_cuts_at_every_until_string(models):
    theirs, ours = models
    prompts = ["Once upon a time", "The", "x y z " * 10, "Hello"]
    free = theirs.generate_until([Instance("generate_until", {}, (p, {"until": [], "max_gen_toks": 12}), i)
                                  for i, p in enumerate(prompts)])
    # stop strings that occur inside the free generations: a word of the 1st, a piece of the 3rd
    stops = [free[0].split()[3], free[2][10:13]]
    reqs = [Instance("generate_until", {}, (p, {"until": stops, "max_gen_toks": 12}), i) for i, p in enumerate(prompts)]
    a, b = ours.generate_until(reqs), theirs.generate_until(reqs)
    assert a == b
    assert a[0] == free[0][: free[0].index(stops[0])] and a[2] == free[2][: free[2].index(stops[1])]
    one = SeqmixLM(ours._model, tokenizer="gpt2", dtype="float32", device="cpu", batch_size=1)
    assert one.generate_until(reqs) == a  # left padding is exact: a batch of 1 gives the same text


def test_generation_stops_at_eos(tmp_path):
    prompt = "Once upon a time"
    ids = fast_tokenizer("gpt2").encode(prompt)
    plain = llama()
    with torch.no_grad():
        greedy = plain.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
    k = next(i for i in range(2, 8) if greedy[i] not in ids + greedy[:i])  # swap a token that first shows up at k
    theirs, ours = pair(tmp_path, llama(swap=(greedy[k], EOS)), batch_size=2)
    reqs = [Instance("generate_until", {}, (p, {"until": [], "max_gen_toks": 8}), i)
            for i, p in enumerate([prompt, "The"])]
    a, b = ours.generate_until(reqs), theirs.generate_until(reqs)
    assert a == b
    assert a[0] == fast_tokenizer("gpt2").decode(greedy[:k])


def test_the_seqmix_model_is_registered_and_declared_as_an_entry_point():
    from importlib.metadata import entry_points

    from lm_eval.api.registry import get_model

    assert get_model("seqmix") is SeqmixLM
    eps = {e.name: e.value for e in entry_points(group="lm_eval.models")}
    assert eps.get("seqmix") == "seqmix.eval.lm_eval:SeqmixLM"


def test_an_attention_model_is_evaluated_within_its_kv_cache_length():
    from seqmix.config import resolve_model
    from seqmix.model import build_model

    torch.manual_seed(0)
    model = build_model(resolve_model("attn,mlp", layers=2, d_model=32, n_heads=2, vocab_size=257, max_seqlen=64))
    lm = SeqmixLM(model, tokenizer="bytes", dtype="float32", device="cpu")
    assert lm.max_length == 64  # not 2048: decoding stops at config.max_seqlen
    req = Instance("generate_until", {}, ("x" * 500, {"until": ["\n"], "max_gen_toks": 48}), 0)
    (text,) = lm.generate_until([req])  # the context keeps its last 64 - 48 tokens
    assert isinstance(text, str)
    with pytest.raises(ValueError, match="max_length=128 exceeds the 64 tokens"):
        SeqmixLM(model, tokenizer="bytes", max_length=128)


def test_bad_model_args_are_refused_with_the_supported_ones(models):
    _, ours = models
    with pytest.raises(ValueError, match="does not take model_args.*parallelize"):
        SeqmixLM(ours._model, tokenizer="gpt2", parallelize=True)
    with pytest.raises(ValueError, match="vocabulary of 50257 tokens but the 'bytes' tokenizer has 257"):
        SeqmixLM(ours._model, tokenizer="bytes", dtype="float32", device="cpu")


def test_python_m_seqmix_eval_is_lm_evals_command_line_with_the_seqmix_model(models, tmp_path):
    from evalkit import based_task_yaml

    model_dir = models[1].pretrained  # the converted copy's directory
    task = based_task_yaml(tmp_path, "fda")
    cmd = [sys.executable, "-m", "seqmix.eval", "--model", "seqmix", "--model_args",
           f"pretrained={model_dir},dtype=float32", "--device", "cpu", "--tasks", str(task), "--limit", "2",
           "--output_path", str(tmp_path / "out")]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TQDM_DISABLE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "based_fda" in proc.stdout and "contains" in proc.stdout  # lm-eval's own results table
    assert list((tmp_path / "out").rglob("results_*.json"))

