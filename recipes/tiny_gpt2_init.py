"""Make the starting point of `checkpoints/tiny-gpt2`: a byte-level BPE tokenizer trained with
`tokenizers` on the train split of the built-in corpus, and a randomly initialised (seeded) GPT-2
saved with it. `moe-convert train` then trains it (see `recipes/tiny-gpt2.yaml`).

    python recipes/tiny_gpt2_init.py -o runs/tiny-gpt2-init
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", required=True, type=Path)
    ap.add_argument("--data", default="builtin:pydoc")
    ap.add_argument("--eval-fraction", type=float, default=0.1, help="must match the train step's")
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--n-positions", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from moe_convert.training.data import load_documents, split_documents, train_bpe_tokenizer

    texts = split_documents(load_documents(args.data).texts, args.eval_fraction)["train"]
    tokenizer = train_bpe_tokenizer(texts, args.vocab_size)
    eos = tokenizer.eos_token_id
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=args.n_positions, n_embd=args.n_embd,
                        n_layer=args.n_layer, n_head=args.n_head, bos_token_id=eos, eos_token_id=eos)
    torch.manual_seed(args.seed)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    print(f"wrote {args.output}: vocab {len(tokenizer)}, {sum(p.numel() for p in model.parameters()):,} parameters")


if __name__ == "__main__":
    main()
