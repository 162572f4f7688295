"""convert_hf.py and --checkpoint hf:DIR: Hugging Face GPT-2 <-> lmsmall, without any download.

A small random GPT2LMHeadModel saved with save_pretrained stands in for gpt2 (the Hub path is the same
from_pretrained call on a name instead of a folder)."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import transformers

from conftest import REPO, run_script
from test_train import assert_one_line_error

GSM8K = "../shared/data/gsm8k/train.jsonl"  # as the README's command has it (scripts run in the repo root)
GSM8K_TOKENS = 20_000                       # enough for a few tiny steps; prepares in seconds
V = 50257


def random_gpt2(seed=0, n_positions=32):
    """A 2-layer GPT2LMHeadModel with every weight random (LayerNorms and biases included), so that each
    tensor's place and orientation matter."""
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64,
                                                                 n_positions=n_positions))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf") / "gpt2-random"
    random_gpt2().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def gsm8k_dir(tmp_path_factory):
    """GSM8K prepared with the gpt2 tokenizer once for the fine-tune and MNTP runs."""
    from base_data_preparer import prepare
    d = tmp_path_factory.mktemp("data")
    prepare(f"json:{(REPO / GSM8K).resolve()}", "gpt2", data_dir=str(d), max_tokens=GSM8K_TOKENS, quiet=True)
    return d


def logits_of(model, idx):
    """Logits of an lmsmall model ((logits, loss)) or of a transformers one (an output with .logits)."""
    with torch.no_grad():
        out = model(idx)
    return out[0] if isinstance(out, tuple) else out.logits


def save(model, path, tokenizer="bytes"):
    from checkpoint import CHECKPOINT_FORMAT
    torch.save({"format": CHECKPOINT_FORMAT, "model_name": model.name, "model_config": dataclasses.asdict(model.config),
                "model_state": model.state_dict(), "model_extra_state": model.extra_state(),
                "config": {"tokenizer": tokenizer}}, path)
    return path


def one_line_error(capsys, code, *words):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert w in lines[0], lines[0]


# ---- Hugging Face -> lmsmall -----------------------------------------------------------------------

def test_from_hf_gives_the_same_logits_loss_and_greedy_text(hf_dir, tmp_path, capsys):
    from checkpoint import load_model
    from convert_hf import main
    out = tmp_path / "gpt2.pt"
    assert main(["from-hf", "--model", str(hf_dir), "--out", str(out)]) == 0
    assert "padded to 50304" in capsys.readouterr().out
    model, ckpt = load_model(str(out))
    assert model.name == "baseline_gpt2" and ckpt["config"]["tokenizer"] == "gpt2"
    assert model.config.vocab_size == 50304 and model.config.block_size == 32
    hf = random_gpt2()
    idx = torch.randint(0, V, (3, 32), generator=torch.Generator().manual_seed(1))
    ours = logits_of(model, idx)
    assert (ours[..., :V] - logits_of(hf, idx)).abs().max() <= 1e-4
    # The 47 padded rows hold the mean embedding: a loss over 50304 logits exceeds GPT-2's by at most
    # log(1 + 47 / 50257) (Jensen), and no more than that.
    with torch.no_grad():
        ours_loss = model(idx[:, :-1], idx[:, 1:])[1].item()
        hf_loss = hf(idx, labels=idx).loss.item()
    assert 0 <= ours_loss - hf_loss <= math.log(1 + 47 / V) + 1e-5
    prompt = idx[:, :5]
    expected = hf.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=V - 1)
    for use_cache in (True, False):
        got = model.generate(prompt, 20, top_k=1, use_cache=use_cache, vocab_limit=V)
        assert torch.equal(got, expected)
    one_line_error(capsys, main(["from-hf", "--model", str(hf_dir), "--out", str(out)]), "already exists")


def test_round_trip_hf_lmsmall_hf_is_exact(hf_dir, tmp_path):
    from convert_hf import main
    from checkpoint import from_hf
    ckpt = from_hf(str(hf_dir))
    torch.save(ckpt, tmp_path / "gpt2.pt")
    assert main(["to-hf", "--checkpoint", str(tmp_path / "gpt2.pt"), "--out", str(tmp_path / "back")]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back")
    original = transformers.GPT2LMHeadModel.from_pretrained(hf_dir)
    a, b = original.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for field in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "activation_function",
                  "layer_norm_epsilon", "tie_word_embeddings", "eos_token_id"):
        assert getattr(back.config, field) == getattr(original.config, field), field


def test_corrupt_or_foreign_hf_folders_get_one_line(hf_dir, tmp_path, capsys):
    from convert_hf import byte_vocabulary, main
    import shutil

    def variant(name, edit):
        d = tmp_path / name
        shutil.copytree(hf_dir, d)
        edit(d)
        return str(d)

    def set_config(**changes):
        def edit(d):
            config = json.loads((d / "config.json").read_text())
            (d / "config.json").write_text(json.dumps(dict(config, **changes)))
        return edit

    def drop_a_tensor(d):
        from safetensors.torch import load_file, save_file
        state = load_file(d / "model.safetensors")
        del state["transformer.h.1.mlp.c_fc.weight"]
        save_file(state, d / "model.safetensors", metadata={"format": "pt"})

    cases = {
        "garbage config": (lambda d: (d / "config.json").write_text("{ not json"), "config"),
        "no config": (lambda d: (d / "config.json").unlink(), "no config.json"),
        "truncated weights": (lambda d: (d / "model.safetensors").write_bytes(
            (d / "model.safetensors").read_bytes()[:5000]), "corrupt"),
        "no weights": (lambda d: (d / "model.safetensors").unlink(), "corrupt"),
        "a tensor missing": (drop_a_tensor, "lack"),
        "another model": (set_config(model_type="gpt_neo"), "gpt_neo"),
        "another vocabulary": (set_config(vocab_size=1000), "vocabulary"),
        "relu": (set_config(activation_function="relu"), "activation_function"),
        "another tokenizer": (lambda d: (d / "vocab.json").write_text(json.dumps(byte_vocabulary())), "tokenizer"),
    }
    for name, (edit, word) in cases.items():
        folder = variant(name.replace(" ", "_"), edit)
        one_line_error(capsys, main(["from-hf", "--model", folder, "--out", str(tmp_path / "x.pt")]), word)
    one_line_error(capsys, main(["from-hf", "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.pt")]),
                   "no Hugging Face model folder")
    assert not (tmp_path / "x.pt").exists()


def test_a_hub_name_offline_without_a_cached_copy_gets_one_line(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}  # no network, an empty cache
    r = run_script("generate.py", "--checkpoint", "hf:gpt2", "--prompt", "2 + 3 =", env=env)
    assert_one_line_error(r, "gpt2", "cannot be reached")


# ---- lmsmall -> Hugging Face -----------------------------------------------------------------------

def exported_logits_match(model, out, n_vocab, block_size):
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(hf, transformers.GPT2LMHeadModel) and hf.config.vocab_size == n_vocab
    idx = torch.randint(0, n_vocab, (2, block_size), generator=torch.Generator().manual_seed(2))
    model.eval()
    diff = (logits_of(model, idx)[..., :n_vocab] - logits_of(hf, idx)).abs().max().item()
    assert diff <= 1e-4, diff


def test_a_trained_byte_run_goes_to_hf_with_a_working_tokenizer(data_dir, tmp_path, capsys):
    from checkpoint import load_model
    from base_data_preparer import get_tokenizer
    from convert_hf import main
    from test_answer_loss import trainer
    run = tmp_path / "run"
    assert trainer(data_dir, run, "--max-steps", 3, "--eval-interval", 3).train() == 0
    capsys.readouterr()
    assert main(["to-hf", "--checkpoint", str(run / "checkpoint.pt"), "--out", str(tmp_path / "hf")]) == 0
    assert "bytes tokenizer" in capsys.readouterr().out
    model, _ = load_model(str(run / "checkpoint.pt"))
    exported_logits_match(model, tmp_path / "hf", 257, model.config.block_size)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "Question: Natalia sold 48 clips. Héllo 😀\nAnswer: 72<|endoftext|>"
    assert tokenizer(text)["input_ids"] == get_tokenizer("bytes").encode(text, allowed_special="all")
    assert tokenizer.eos_token_id == 256
    code = main(["to-hf", "--checkpoint", str(run / "checkpoint.pt"), "--out", str(tmp_path / "hf")])
    one_line_error(capsys, code, "already exists")


@pytest.mark.parametrize("name,stage,overrides", [
    ("progressive_diverging", 1, {}), ("progressive_diverging", 2, {}), ("progressive_diverging", 3, {}),
    ("baseline_gpt2", None, {"pos": "sinusoidal"}), ("baseline_gpt2", None, {"pos": "none"})])
def test_progressive_stages_and_fixed_positions_export_exactly(name, stage, overrides, tmp_path):
    from convert_hf import export_hf
    from models import create_model
    torch.manual_seed(0)
    model = create_model(name, preset="tiny", vocab_size=320, block_size=32, n_layer=4, n_head=2, n_embd=32,
                         **overrides)
    if stage:
        model.set_stage(stage)
        with torch.no_grad():  # a trained LoRA update (B starts at zero), so that merging matters
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
    line = export_hf(str(save(model, tmp_path / "ckpt.pt")), str(tmp_path / "hf"))
    assert ("shared blocks unrolled" in line) == (stage in (1, 2))
    exported_logits_match(model, tmp_path / "hf", 257, 32)


@pytest.mark.parametrize("name,overrides,word", [
    ("conv_attention", {}, "hourglass"), ("dual_mask_gpt", {}, "task tokens"),
    ("baseline_gpt2", {"pos": "alibi"}, "ALiBi"), ("baseline_gpt2", {"head": "clap"}, "CLAP"),
    ("progressive_diverging", {"attention": "bidirectional"}, "encoder"),
    # the modern switches: relu2, rope and clap-cosine used to export silently as a model computing other logits,
    # swiglu, rms and qk_norm ended in a traceback
    ("baseline_gpt2", {"mlp": "relu2"}, "relu2"), ("baseline_gpt2", {"pos": "rope"}, "RoPE"),
    ("baseline_gpt2", {"head": "clap-cosine"}, "CLAP-cosine"), ("baseline_gpt2", {"mlp": "swiglu"}, "SwiGLU"),
    ("baseline_gpt2", {"norm": "rms"}, "RMSNorm"), ("baseline_gpt2", {"qk_norm": True}, "QK-norm"),
    ("progressive_diverging", {"mlp": "relu2"}, "relu2")])
def test_models_without_a_gpt2_equivalent_are_refused_in_one_line(name, overrides, word, tmp_path, capsys):
    from convert_hf import main
    from models import create_model
    model = create_model(name, preset="tiny", vocab_size=320, block_size=64, **overrides)
    code = main(["to-hf", "--checkpoint", str(save(model, tmp_path / "ckpt.pt")), "--out", str(tmp_path / "hf")])
    one_line_error(capsys, code, "cannot go to Hugging Face", word)
    assert not (tmp_path / "hf").exists()


def test_an_export_whose_logits_differ_is_refused_and_nothing_written(tmp_path, capsys, monkeypatch):
    """The last line of defence: whatever the options, the exported GPT2LMHeadModel must compute the logits of the
    lmsmall model, checked before the folder is written."""
    import convert_hf
    from models import create_model
    model = create_model("baseline_gpt2", preset="tiny", vocab_size=320, block_size=32, n_layer=2, n_head=2, n_embd=32)
    exact = convert_hf.hf_state_dict

    def off_by_one_bias(m, n_vocab):
        state = exact(m, n_vocab)
        state["transformer.ln_f.bias"] = state["transformer.ln_f.bias"] + torch.linspace(0, 1, 32)
        return state
    monkeypatch.setattr(convert_hf, "hf_state_dict", off_by_one_bias)
    code = convert_hf.main(["to-hf", "--checkpoint", str(save(model, tmp_path / "ckpt.pt")), "--out", str(tmp_path / "hf")])
    one_line_error(capsys, code, "computes other logits")
    assert not (tmp_path / "hf").exists() and [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


# ---- --checkpoint hf:DIR in every script -----------------------------------------------------------

def test_generate_evaluate_and_embed_take_hf_checkpoints(hf_dir, gsm8k_dir, tmp_path, capsys):
    import embed
    import evaluate
    import generate
    from base_data_preparer import get_tokenizer
    enc = get_tokenizer("gpt2")
    prompt = "Question: Natalia sold 48 clips."
    assert generate.main(["--checkpoint", f"hf:{hf_dir}", "--prompt", prompt, "--top-k", "1",
                          "--max-new-tokens", "12"]) == 0
    ids = torch.tensor([enc.encode(prompt)])
    expected = random_gpt2().generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=V - 1)
    assert capsys.readouterr().out.strip() == enc.decode(expected[0].tolist()).strip()

    out = tmp_path / "eval.json"
    assert evaluate.main(["--checkpoint", f"hf:{hf_dir}", "--data", f"json:{(REPO / GSM8K).resolve()}",
                          "--data-dir", str(gsm8k_dir), "--split", "val", "--eval-batches", "1", "--task", f"json:{REPO / GSM8K}",
                          "--limit", "2", "--max-new-tokens", "4", "--loss", "--quiet", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["model"] == "baseline_gpt2" and result["accuracy"]["total"] == 2
    assert 0 < result["loss"]["loss"] < 30

    (tmp_path / "texts.txt").write_text("What is 2 + 3?\nNatalia sold clips.\n")
    assert embed.main(["--checkpoint", f"hf:{hf_dir}", "--input", str(tmp_path / "texts.txt"),
                       "--out", str(tmp_path / "e.npy")]) == 0
    assert np.load(tmp_path / "e.npy").shape == (2, 64)


def test_finetune_and_mntp_from_hf_run_end_to_end_and_go_back_to_hf(hf_dir, gsm8k_dir, tmp_path, capsys):
    from checkpoint import load_model
    from base_data_preparer import get_tokenizer
    from convert_hf import main
    run = tmp_path / "ft"
    tiny = ["--data-dir", gsm8k_dir, "--max-tokens", GSM8K_TOKENS, "--max-steps", 2, "--seq-len", 32,
            "--micro-batch-size", 2, "--total-batch-size", 64, "--eval-batches", 1, "--device", "cpu"]
    r = run_script("finetune.py", "--checkpoint", f"hf:{hf_dir}", "--data", f"json:{GSM8K}", "--loss-on", "answer",
                   "--out-dir", run, *tiny)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(row["split"] == "train" and row["step"] == 1 for row in rows)
    model, ckpt = load_model(str(run / "checkpoint.pt"))
    assert ckpt["config"]["checkpoint"] == f"hf:{hf_dir}" and ckpt["config"]["loss_on"] == "answer"
    assert not torch.equal(model.wpe.weight, random_gpt2().transformer.wpe.weight)  # it trained
    # the fine-tuned model goes back to Hugging Face, with GPT-2's tokenizer
    assert main(["to-hf", "--checkpoint", str(run / "checkpoint.pt"), "--out", str(tmp_path / "hf")]) == 0
    assert "gpt2 tokenizer" in capsys.readouterr().out
    exported_logits_match(model, tmp_path / "hf", V, 32)
    text = "Question: Natalia sold 48 clips. Héllo 😀\nAnswer: 72<|endoftext|>"
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tokenizer(text)["input_ids"] == get_tokenizer("gpt2").encode(text, allowed_special="all")

    # python train_mntp.py --checkpoint hf:DIR ..., in this process (what train_mntp.py's __main__ runs)
    from train_mntp import MNTPTrainer, resolve, run as train_mntp
    mntp = ["--checkpoint", f"hf:{hf_dir}", "--data", f"json:{(REPO / GSM8K).resolve()}",
            "--out-dir", str(tmp_path / "mntp"), *map(str, tiny)]
    assert train_mntp(MNTPTrainer, mntp, resolve) == 0
    rows = [json.loads(line) for line in (tmp_path / "mntp" / "metrics.jsonl").read_text().splitlines()]
    assert any(row["split"] == "val" and "acc" in row for row in rows)
    model, ckpt = load_model(str(tmp_path / "mntp" / "checkpoint.pt"))
    assert model.config.attention == "bidirectional" and ckpt["config"]["mask_token"] == V
    capsys.readouterr()
    code = train_mntp(MNTPTrainer, ["--checkpoint", f"hf:{hf_dir}", "--tokenizer", "bytes", "--out-dir",
                                    str(tmp_path / "x")], resolve)
    one_line_error(capsys, code, "tokenizer")


def test_simcse_from_hf_trains_and_embeds(hf_dir, gsm8k_dir, tmp_path):
    """python train_simcse.py --checkpoint hf:DIR (LLM2Vec's recipe started from Hugging Face weights), in this
    process: a bidirectional encoder with the recorded pooling, which embed.py uses."""
    import embed
    from checkpoint import load_model
    from train_simcse import SimCSETrainer, resolve, run as train_simcse
    out = tmp_path / "simcse"
    args = ["--checkpoint", f"hf:{hf_dir}", "--data", f"json:{(REPO / GSM8K).resolve()}", "--data-dir", gsm8k_dir,
            "--max-tokens", "150k", "--max-steps", 2, "--eval-interval", 2, "--eval-batches", 1,
            "--batch-size", 2, "--max-len", 24, "--pooling", "eos", "--device", "cpu", "--out-dir", out]
    assert train_simcse(SimCSETrainer, list(map(str, args)), resolve) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(r["split"] == "val" and {"loss", "alignment", "uniformity"} <= set(r) for r in rows)
    model, ckpt = load_model(str(out / "checkpoint.pt"))
    assert model.config.attention == "bidirectional" and ckpt["config"]["checkpoint"] == f"hf:{hf_dir}"
    base, _ = load_model(f"hf:{hf_dir}")
    assert not torch.equal(model.blocks[0].attn.c_attn.weight, base.blocks[0].attn.c_attn.weight)  # LoRA, merged
    (tmp_path / "texts.txt").write_text("What is 2 + 3?\nNatalia sold clips.\n")
    assert embed.main(["--checkpoint", str(out / "checkpoint.pt"), "--input", str(tmp_path / "texts.txt"),
                       "--out", str(tmp_path / "e.npy")]) == 0
    assert np.load(tmp_path / "e.npy").shape == (2, 64)
