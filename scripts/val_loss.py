"""The validation loss of a trained model, measured apart from training: the mean loss over
random windows of the validation split (the last tenth of the text), in float32.

    python scripts/val_loss.py [MODEL.pth] [--data_path=ci.txt] [--windows=1000]
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import babygpt  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default="model.pth")
    p.add_argument("--data_path", default="ci.txt")
    p.add_argument("--windows", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    try:
        text = babygpt.load_corpus(args.data_path)
        sd = babygpt.load_file(args.model, "model file")
        shape = babygpt.state_dict_shape(sd, args.model)
    except babygpt.UserError as e:
        sys.exit(f"error: {e}")
    tokenizer = babygpt.Tokenizer(text)
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    val = ids[int(0.9 * len(ids)):]
    model = babygpt.BabyGPT(tokenizer.vocab_size, shape["block_size"], shape["n_embed"],
                            babygpt.head_count(sd) or babygpt.n_head, shape["n_layer"], dropout=0.0)
    model.load_state_dict(sd)  # either layout
    model.eval()
    gen = torch.Generator().manual_seed(args.seed)
    total, done = 0.0, 0
    with torch.no_grad():
        while done < args.windows:
            n = min(100, args.windows - done)
            x, y = babygpt.get_batch(val, n, shape["block_size"], gen)
            total += model(x, y)[1].item() * n
            done += n
    print(f"{args.model}: val loss {total / done:.4f} over {done} random windows of {shape['block_size']} "
          f"characters ({shape['n_layer']} layers, {shape['n_embed']} wide)")


if __name__ == "__main__":
    main()
