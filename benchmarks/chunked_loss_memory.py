"""Peak memory of the loss step: transformers' causal-LM loss over full logits vs our chunked loss.

A LLaVA-1.5-shaped micro-batch (vocabulary 32064, 576 image tokens per sample, the rest prompt and
answer with a quarter of the text supervised); each variant runs forward + backward to the hidden
states in a fresh process, and the figure is its peak RSS above the inputs. The hidden width is cut
to keep the CPU time short: the logits chain (what the chunked loss removes) does not depend on it.

    .venv/bin/python benchmarks/chunked_loss_memory.py [--batch 4 --length 2048 --hidden 1024]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

VOCAB, IMAGE_TOKENS, SUPERVISED_TEXT = 32064, 576, 0.25


def run_variant(variant: str, batch: int, length: int, hidden_size: int) -> dict:
    import torch
    from transformers.loss.loss_utils import ForCausalLMLoss

    from llava_cluster.train.chunked_loss import chunked_causal_lm_loss

    torch.manual_seed(0)
    hidden = torch.randn(batch, length, hidden_size, requires_grad=True)
    weight = torch.randn(VOCAB, hidden_size) / hidden_size**0.5
    labels = torch.randint(0, VOCAB, (batch, length))
    labels[:, :IMAGE_TOKENS] = -100
    text = torch.rand(batch, length - IMAGE_TOKENS) > SUPERVISED_TEXT
    labels[:, IMAGE_TOKENS:][text] = -100
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if variant == "plain":
        loss = ForCausalLMLoss(hidden @ weight.T, labels, VOCAB)
    else:
        loss = chunked_causal_lm_loss(hidden, weight, labels)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"variant": variant, "loss": float(loss), "extra_peak_mib": (peak - before) / 1024, "seconds": seconds,
            "supervised": int((labels[:, 1:] != -100).sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--variant", choices=("plain", "chunked"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.batch, args.length, args.hidden)))
        return
    rows = []
    for variant in ("plain", "chunked"):
        out = subprocess.run([sys.executable, __file__, "--variant", variant, "--batch", str(args.batch),
                              "--length", str(args.length), "--hidden", str(args.hidden)],
                             capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    tokens = args.batch * args.length
    print(f"loss step, {args.batch} x {args.length} tokens ({rows[0]['supervised']} supervised), vocabulary {VOCAB}, "
          f"hidden {args.hidden}, fp32 on CPU")
    print(f"{'variant':<10}{'loss':>10}{'peak above inputs':>20}{'seconds':>10}")
    for row in rows:
        print(f"{row['variant']:<10}{row['loss']:>10.4f}{row['extra_peak_mib']:>16.0f} MiB{row['seconds']:>10.1f}")
    plain, chunked = rows
    print(f"chunked / plain peak: {chunked['extra_peak_mib'] / plain['extra_peak_mib']:.3f} "
          f"({tokens * VOCAB * 4 / 2**20:.0f} MiB is one fp32 logits tensor)")


if __name__ == "__main__":
    main()
