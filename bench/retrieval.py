"""
Retrieval check of the embeddings (embed.py): GSM8K questions as queries, their worked answers as documents.

    python bench/retrieval.py --causal runs/retrieval/gsm8k_causal/checkpoint.pt \\
        --mntp runs/retrieval/gsm8k_mntp/checkpoint.pt --dual runs/retrieval/gsm8k_dual/checkpoint.pt
    python bench/retrieval.py --causal ... --pairs train --limit 500
    python bench/retrieval.py --causal ... --causal-simcse runs/retrieval/gsm8k_causal_simcse/checkpoint.pt \
        --mntp-simcse runs/retrieval/gsm8k_mntp_simcse/checkpoint.pt --out runs/retrieval/table.json

Each question must find its own answer among all N answers (shuffled). One row group per pipeline given:
causal, causal + SimCSE (train_simcse.py on the causal checkpoint), mntp, mntp + SimCSE, dual. Per pipeline
three scorings, each with recall@1, recall@10 and MRR:
    pooled            cosine of the pooled embeddings (embed.embed: mean-pooled, or as a SimCSE checkpoint
                      was trained)
    pooled, centered  the same after subtracting each side's mean vector (the queries' mean from every query,
                      the documents' mean from every document) and renormalising. Unsupervised (no pair is
                      looked at), but it uses the whole query and document sets: it removes what all
                      queries (all documents) share, e.g. "this is a question" / "this is a worked answer".
    maxsim            token-level late interaction (embed.maxsim)
For context: the expected values of a random ranking (recall@k = k/N, MRR = H_N/N) and a lexical baseline,
TF-IDF cosine over lower-cased words and numbers (answers restate the question's numbers, so this is strong).

--pairs heldout (default): every GSM8K train record the data preparer puts in val or test (a hash of the
document), i.e. pairs that models trained on json:train.jsonl never saw; 141 of the 7,473.
--pairs train: records of the train split (seen in training, as language-model text), the first --limit.
--out FILE.json: the table as JSON (rows of kind, scoring, recall@1, recall@10, mrr, seconds; the runs), which
bench/retrieval_seeds.py averages over seeds.
"""

import json
import os
import re
import sys
import time
from collections import Counter

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from plumbing import cli  # noqa: E402
from checkpoint import CheckpointError, load_model
from base_data_preparer import get_tokenizer  # noqa: E402
from bench.machine import describe as describe_machine  # noqa: E402
from data_file_utils import DataError, split_of_text  # noqa: E402
from embed import EmbedError, default_pooling, embed, embedding_kind, maxsim, token_embeddings  # noqa: E402

# The pipelines, in the table's order: (flag, the row label, the checkpoint's embedding kind, what its
# SimCSE started from: None, or the base's attention).
PIPELINES = [("causal", "causal", "causal", None), ("causal_simcse", "causal + simcse", "simcse", "causal"),
             ("mntp", "mntp", "mntp", None), ("mntp_simcse", "mntp + simcse", "simcse", "bidirectional"),
             ("dual", "dual", "dual", None)]
DEFAULT_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data",
                            "gsm8k", "train.jsonl")


def load_pairs(path, pairs, limit, seed):
    """(questions, documents, gold): documents are the answers shuffled; gold[i] is question i's answer."""
    questions, answers = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            held_out = split_of_text(f"Question: {r['question']}\nAnswer: {r['answer']}").value != "train"
            if held_out == (pairs == "heldout"):
                questions.append(r["question"])
                answers.append(r["answer"])
            if limit and len(questions) == limit:
                break
    perm = np.random.default_rng(seed).permutation(len(answers))   # documents[j] = answers[perm[j]]
    gold = np.argsort(perm)                                          # answers[i] sits at documents[gold[i]]
    return questions, [answers[j] for j in perm], gold


def rank_metrics(scores, gold):
    """recall@1, recall@10 and MRR of a (Nq, Nd) score matrix (rank = 1 + documents scored higher)."""
    gold_score = scores[np.arange(len(gold)), gold]
    ranks = 1 + (scores > gold_score[:, None]).sum(1)
    return {"recall@1": float((ranks <= 1).mean()), "recall@10": float((ranks <= 10).mean()),
            "mrr": float((1.0 / ranks).mean())}


def random_metrics(n):
    """Expected values of a uniformly random ranking of n documents."""
    return {"recall@1": 1 / n, "recall@10": min(10, n) / n, "mrr": sum(1 / k for k in range(1, n + 1)) / n}


def tfidf_scores(queries, documents):
    """Cosine of TF-IDF vectors of lower-cased words and numbers (idf over queries and documents together)."""
    def words(t):
        return re.findall(r"[a-z]+|\d+(?:\.\d+)?", t.lower().replace(",", ""))
    counts = [Counter(words(t)) for t in queries + documents]
    vocab = {w: i for i, w in enumerate(sorted(set().union(*counts)))}
    df = np.zeros(len(vocab))
    for c in counts:
        df[[vocab[w] for w in c]] += 1
    idf = np.log((1 + len(counts)) / (1 + df)) + 1
    M = np.zeros((len(counts), len(vocab)), dtype=np.float32)
    for r, c in enumerate(counts):
        for w, n in c.items():
            M[r, vocab[w]] = n * idf[vocab[w]]
    M /= np.linalg.norm(M, axis=1, keepdims=True).clip(min=1e-12)
    return M[:len(queries)] @ M[len(queries):].T


def centered(E):
    """Rows minus their mean, renormalised to unit length."""
    E = E - E.mean(0, keepdims=True)
    return E / np.linalg.norm(E, axis=1, keepdims=True).clip(min=1e-12)


def check_pipeline(flag, path, model, ckpt, kind, simcse_base):
    """The checkpoint given for --flag is of the pipeline the flag names (EmbedError otherwise)."""
    option = "--" + flag.replace("_", "-")
    got = embedding_kind(model, ckpt)
    if got != kind:
        raise EmbedError(f"{option} {path} is a {got} checkpoint, not {kind}")
    if simcse_base is not None:
        base = ckpt["config"].get("base_model_config", {}).get("attention", "causal")
        if base != simcse_base:
            raise EmbedError(f"{option} {path} is SimCSE on a {'causal' if base == 'causal' else 'MNTP'} checkpoint; "
                             f"give it to --{'causal' if base == 'causal' else 'mntp'}-simcse")


def evaluate_checkpoint(path, label, questions, documents, gold, batch_size, with_maxsim, model, ckpt):
    enc = get_tokenizer(ckpt["config"]["tokenizer"])
    pooling = default_pooling(ckpt)
    rows = []
    t0 = time.time()
    Q, D = (embed(model, enc, texts, batch_size=batch_size, pooling=pooling) for texts in (questions, documents))
    rows.append((label, "pooled", rank_metrics(Q @ D.T, gold), time.time() - t0))
    rows.append((label, "pooled, centered", rank_metrics(centered(Q) @ centered(D).T, gold), time.time() - t0))
    if with_maxsim:
        t0 = time.time()
        q_tok = token_embeddings(model, enc, questions, batch_size=batch_size)
        d_tok = token_embeddings(model, enc, documents, batch_size=batch_size)
        rows.append((label, "maxsim", rank_metrics(maxsim(q_tok, d_tok), gold), time.time() - t0))
    return rows


def main(argv=None):
    p = cli.ArgumentParser(description="GSM8K question -> answer retrieval with embed.py's embeddings.")
    p.add_argument("--causal", help="checkpoint of a causal model (e.g. baseline_gpt2)")
    p.add_argument("--causal-simcse", help="checkpoint written by train_simcse.py from a causal checkpoint")
    p.add_argument("--mntp", help="checkpoint written by train_mntp.py")
    p.add_argument("--mntp-simcse", help="checkpoint written by train_simcse.py from an MNTP checkpoint")
    p.add_argument("--dual", help="checkpoint of a dual_mask_gpt model")
    p.add_argument("--data", default=DEFAULT_DATA, help="GSM8K-format JSON lines (default: shared GSM8K train)")
    p.add_argument("--pairs", choices=["heldout", "train"], default="heldout")
    p.add_argument("--limit", type=cli.positive_int, help="at most this many pairs")
    p.add_argument("--seed", type=cli.seed, default=0, help="document shuffle")
    p.add_argument("--no-maxsim", action="store_true", help="pooled embeddings only")
    p.add_argument("--batch-size", type=cli.positive_int, default=32)
    p.add_argument("--out", help="write the table as JSON (bench/retrieval_seeds.py reads it)")
    args = p.parse_args(argv)
    try:
        if not os.path.isfile(args.data):
            raise EmbedError(f"--data {args.data}: no such file")
        questions, documents, gold = load_pairs(args.data, args.pairs, args.limit, args.seed)
        if len(questions) < 2:
            raise EmbedError(f"only {len(questions)} pair(s) selected; need at least 2")
        n = len(questions)
        rows = [("random ranking (expected)", "-", random_metrics(n), 0.0)]
        t0 = time.time()
        rows.append(("lexical TF-IDF", "cosine", rank_metrics(tfidf_scores(questions, documents), gold),
                     time.time() - t0))
        runs = {}
        for flag, label, kind, simcse_base in PIPELINES:
            path = getattr(args, flag)
            if path:
                model, ckpt = load_model(path)
                check_pipeline(flag, path, model, ckpt, kind, simcse_base)
                rows += evaluate_checkpoint(path, label, questions, documents, gold, args.batch_size,
                                            not args.no_maxsim, model, ckpt)
                runs[label] = {"checkpoint": path, "model": ckpt["model_name"], "step": ckpt.get("step"),
                               "tokenizer": ckpt["config"]["tokenizer"], "context": ckpt["model_config"]["block_size"],
                               "pooling": default_pooling(ckpt)}
    except (EmbedError, CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"machine: {describe_machine('cpu')}")
    print(f"{n} GSM8K pairs ({args.pairs}), queries = questions, documents = answers (shuffled, seed {args.seed})\n")
    print("| embedding | scoring | recall@1 | recall@10 | MRR | seconds |\n|---|---|---|---|---|---|")
    for kind, scoring, m, seconds in rows:
        print(f"| {kind} | {scoring} | {m['recall@1']:.3f} | {m['recall@10']:.3f} | {m['mrr']:.3f} | {seconds:.1f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"pairs": args.pairs, "n": n, "runs": runs,
                       "rows": [dict(kind=k, scoring=s, seconds=t, **m) for k, s, m, t in rows]}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
