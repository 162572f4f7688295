"""
Text from a checkpoint:

    python generate.py --checkpoint runs/baseline_gpt2/checkpoint.pt --prompt $'Question: What is 2 + 3?\nAnswer:' --top-k 1

A sample ends at <|endoftext|> (the end of a document in the training data; not printed) or after
--max-new-tokens; --no-stop goes on past <|endoftext|>. Prompts in the training format
("Question: ...\nAnswer:", as the data preparer writes question/answer documents) get answers.
"""

from plumbing import ctrl_c  # noqa: F401  (first: Ctrl-C during the imports below is one line, exit 130)

import sys

import torch

from plumbing import cli
from checkpoint import CheckpointError, load_model, tokenizer_of
from data_file_utils import DataError
from models import ModelConfigError


def main(argv=None):
    p = cli.ArgumentParser(description="Sample text from a trained lmsmall checkpoint.")
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint file, a run folder (its checkpoint.pt) or hf:NAME_OR_DIR")
    p.add_argument("--prompt", default="", help="text to continue (empty: start a new document)")
    p.add_argument("--max-new-tokens", type=cli.nonnegative_int, default=200)
    p.add_argument("--temperature", type=cli.nonnegative_float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=cli.positive_int, default=None)
    p.add_argument("--num-samples", type=cli.positive_int, default=1)
    p.add_argument("--seed", type=cli.seed, default=1337)
    p.add_argument("--device", type=cli.device, default="cpu", help="cpu (default), auto, cuda, cuda:N, mps")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context for every token")
    p.add_argument("--no-stop", action="store_true", help="go on after <|endoftext|> (default: a sample ends there)")
    args = p.parse_args(argv)
    args.device = cli.pick_device(args.device)
    if any("\udc80" <= c <= "\udcff" for c in args.prompt):  # bytes that are not UTF-8 (surrogateescape)
        print("error: argument --prompt: not valid UTF-8 (the tokenizer would replace those bytes with U+FFFD); "
              "give the prompt as UTF-8 text", file=sys.stderr)
        return 2
    try:
        model, ckpt = load_model(args.checkpoint, device=args.device)
        enc = tokenizer_of(model, ckpt, args.checkpoint)
    except (CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.max_new_tokens < 0 or args.temperature < 0 or (args.top_k is not None and args.top_k < 1):
        print("error: --max-new-tokens and --temperature must be >= 0 and --top-k >= 1", file=sys.stderr)
        return 2
    tokens = enc.encode(args.prompt, allowed_special="all") if args.prompt else [enc.eot_token]
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    idx = torch.tensor([tokens] * args.num_samples, dtype=torch.long, device=args.device)
    try:
        out = model.generate(idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                             use_cache=not args.no_cache, generator=generator, vocab_limit=enc.n_vocab,
                             eos_token=None if args.no_stop else enc.eot_token)
    except ModelConfigError as e:  # e.g. a model trained to predict 64 tokens ahead cannot continue text
        print(f"error: {e}", file=sys.stderr)
        return 2
    for i, row in enumerate(out.tolist()):
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        new = row[len(tokens):]
        if not args.no_stop and enc.eot_token in new:
            new = new[:new.index(enc.eot_token)]
        print(enc.decode((tokens if args.prompt else []) + new))
    return 0


if __name__ == "__main__":
    sys.exit(main())
