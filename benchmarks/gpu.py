"""GPU timings (issue 13): cascade inference, one fine-tuning epoch of one block and one alignment
round, at 64, 128 and 256 px; prints a table and records it in docs/scale.json / docs/scale.md.

    python -m benchmarks.gpu                       # on cuda:0, the sizes below
    python -m benchmarks.gpu --device cpu --n 64 --no-record    # a smoke run anywhere

Random images (timings do not depend on content). Inference: the 3-block cascade of the shipped
weights in eval mode (bf16 autocast on CUDA, as `cdae-em` runs it), batches of --batch images.
Fine-tuning epoch: ``train.train_block`` on --n pairs (batch 32, as `cdae-em`). Alignment round:
``multiref.align_to_references`` of --n images against --refs references (psi step 5 degrees).
CUDA timings are synchronised; the first call of each is a warm-up and not timed.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    fn()  # warm-up
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def measure(box: int, n: int, refs: int, batch: int, device: torch.device) -> dict:
    from dataclasses import replace

    from cdae_em.core.multiref import align_to_references
    from cdae_em.denoise.train import autocast, train_block
    from cdae_em.settings import TrainSettings
    from cdae_em.denoise.weights import default_weights_path, load_weights

    g = torch.Generator().manual_seed(0)
    images = torch.randn(n, box, box, generator=g)
    model, _ = load_weights(default_weights_path(), map_location=device)
    model.eval().to(device)
    x = images.to(device)

    @torch.no_grad()
    def infer():
        for s in range(0, n, batch):
            with autocast(device):
                model(x[s:s + batch])

    t_inf = timed(infer, device)
    block = model.blocks[0]
    targets = images.numpy()
    settings = replace(TrainSettings(), epochs=1, val_fraction=0.0)
    t_train = timed(lambda: train_block(block, images.numpy(), targets, settings, device), device)
    references = torch.randn(refs, box, box, generator=g).to(device)
    t_align = timed(lambda: align_to_references(x, references, psi_step=5.0, batch_size=batch, device=device), device)
    return {"box": box, "n": n, "refs": refs, "inference_images_per_s": n / t_inf,
            "finetune_epoch_s": t_train, "finetune_images_per_s": n / t_train,
            "align_round_s": t_align, "align_images_per_s": n / t_align}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda:0", help="cuda:N or cpu (default: cuda:0)")
    parser.add_argument("--boxes", default="64,128,256", help="box sizes (default: 64,128,256)")
    parser.add_argument("--n", type=int, default=4000, help="images per measurement (default: 4000)")
    parser.add_argument("--refs", type=int, default=50, help="references in the alignment round (default: 50)")
    parser.add_argument("--batch", type=int, default=128, help="inference/alignment batch (default: 128)")
    parser.add_argument("--no-record", action="store_true", help="print only; leave docs/scale.* alone")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"benchmarks.gpu: no CUDA device (torch {torch.__version__}); try --device cpu", file=sys.stderr)
        return 1
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    rows = []
    for box in [int(b) for b in args.boxes.split(",")]:
        rows.append({"device": name, **measure(box, args.n, args.refs, args.batch, device)})
        r = rows[-1]
        print(f"{box} px: inference {r['inference_images_per_s']:.0f} img/s, fine-tuning epoch "
              f"{r['finetune_epoch_s']:.1f} s ({r['n']} images), alignment round {r['align_round_s']:.1f} s "
              f"({r['n']} images x {r['refs']} references)", file=sys.stderr, flush=True)
    header = "| device | box | inference img/s | fine-tuning epoch s (img/s) | alignment round s (img/s) |"
    print(header + "\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['device']} | {r['box']} | {r['inference_images_per_s']:,.0f} | {r['finetune_epoch_s']:.2f} "
              f"({r['finetune_images_per_s']:,.0f}) | {r['align_round_s']:.2f} ({r['align_images_per_s']:,.0f}) |")
    if not args.no_record:
        from benchmarks.scale import REPORT, merge, report

        REPORT.write_text(report(merge("gpu", rows, ("device", "box"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
