"""`data check`: read every sample of a LLaVA data file and report every defect before a GPU hour is spent.

Structure comes from `schema.check_sample`; this module adds what needs I/O: JSON syntax (via the
streaming `reader`), duplicate ids, the image files themselves and, with a model, token lengths after
the image is expanded — the samples that training would silently truncate or train on nothing.
"""

from __future__ import annotations

from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llava_cluster.data.images import ImageFolder, ImageProblem
from llava_cluster.data.reader import SampleReader
from llava_cluster.data.schema import DEFECT_KINDS, Defect, blocks_encoding, check_sample, sample_id
from llava_cluster.errors import UserError

DEFAULT_MAX_LENGTH = 2048
PRINT_CAP = 20  # defects printed per kind; --json carries all of them


@dataclass
class CheckReport:
    path: str
    image_folder: str | None
    samples: int = 0
    with_image: int = 0
    text_only: int = 0
    turns: int = 0
    images_checked: int = 0  # distinct image files opened
    stopped_early: bool = False
    defects: list[Defect] = field(default_factory=list)
    tokens: dict[str, Any] | None = None  # with --model: limit, template, over limit, tokens lost

    @property
    def counts(self) -> dict[str, int]:
        found = Counter(d.kind for d in self.defects)
        return {kind: found[kind] for kind in DEFECT_KINDS if found[kind]}

    @property
    def defective_samples(self) -> int:
        return len({d.index for d in self.defects})

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.path,
            "image_folder": self.image_folder,
            "ok": not self.defects,
            "samples": self.samples,
            "modality": {"image": self.with_image, "text_only": self.text_only},
            "turns": self.turns,
            "images_checked": self.images_checked,
            "stopped_early": self.stopped_early,
            "defective_samples": self.defective_samples,
            "counts": self.counts,
            "tokens": self.tokens,
            "defects": [d.to_dict() for d in self.defects],
        }


class ImageChecker:
    """Check each distinct image once, through `ImageFolder`: contained, a regular non-empty file, within
    the pixel limit, and fully decodable."""

    def __init__(self, folder: str | Path, workers: int = 1) -> None:
        self.folder = ImageFolder(folder)
        self.cache: dict[str, Future] = {}
        # Pillow's decoders release the GIL: threads decode several images at once.
        self.pool = ThreadPoolExecutor(workers) if workers > 1 else None

    def submit(self, rel: str) -> Future:
        """A future of (kind, message) of what is wrong with this image, or None when it is fine."""
        if rel not in self.cache:
            if self.pool is not None:
                self.cache[rel] = self.pool.submit(self._check, rel)
            else:
                done: Future = Future()
                done.set_result(self._check(rel))
                self.cache[rel] = done
        return self.cache[rel]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)

    def _check(self, rel: str) -> tuple[str, str] | None:
        try:
            self.folder.verify(rel)
        except ImageProblem as problem:
            return problem.kind, problem.message
        return None


class TokenChecker:
    """Encode structurally valid samples exactly as training will and flag what truncation would cut."""

    def __init__(self, model: str | Path, max_length: int, template: str | None,
                 image_folder: str | Path | None = None) -> None:
        from llava_cluster.data.encode import encode_sample
        from llava_cluster.data.templates import get_template
        from llava_cluster.model.load import image_tokens, load_processor, template_for

        if not Path(model).exists():
            raise UserError(f"model folder not found: {model}", 2)
        template = template_for(model, template)
        self.template = get_template(template)
        processor = load_processor(model)
        self.tokenizer = processor.tokenizer
        # Any-resolution families: each image's count from its header (the folder is checked on its own).
        self.counter = image_tokens(processor, model)
        self.folder = ImageFolder(image_folder) if image_folder is not None and Path(image_folder).is_dir() else None
        self.image_tokens = self.counter.square
        self.encode = encode_sample
        self.max_length = max_length
        self.over_limit = self.no_labels = self.lost_tokens = self.longest = 0
        self.summary: dict[str, Any] = {"max_length": max_length, "template": template,
                                        "image_seq_length": self.image_tokens,
                                        "image_tokens_per_image": self.counter.anyres}

    def check(self, index: int, sample: dict[str, Any]) -> Defect | None:
        image = self.counter.for_sample(sample, self.folder) if sample.get("image") else 0
        enc = self.encode(sample, self.tokenizer, self.template, image, self.max_length)
        self.longest = max(self.longest, enc.full_length)
        if enc.full_length <= self.max_length:
            return None
        self.over_limit += 1
        self.lost_tokens += enc.lost_tokens
        sid = sample_id(sample)
        if all(label == -100 for label in enc.labels):
            self.no_labels += 1
            return Defect(index, sid, "conversations[0:2]", "first_round_too_long",
                          f"{enc.full_length} tokens (image = {image}); the first round alone exceeds "
                          f"--max-length {self.max_length}, so the sample is kept without labels or image")
        return Defect(index, sid, "conversations", "too_long",
                      f"{enc.full_length} tokens (image = {image}) > --max-length {self.max_length}: "
                      f"truncation drops {enc.lost_tokens} tokens ({enc.dropped_rounds} round(s))")

    def finish(self) -> dict[str, Any]:
        return {**self.summary, "over_limit": self.over_limit, "no_labels": self.no_labels,
                "lost_tokens": self.lost_tokens, "longest": self.longest}


def check_file(
    path: str | Path,
    image_folder: str | Path | None = None,
    model: str | Path | None = None,
    max_length: int = DEFAULT_MAX_LENGTH,
    template: str | None = None,
    progress: bool = False,
    workers: int = 1,
) -> CheckReport:
    """Check every sample of `path`; raises UserError(exit 2) only for unusable input.
    `workers` > 1 checks images in that many threads."""
    reader = SampleReader(path)
    images = ImageChecker(image_folder, workers) if image_folder is not None else None
    tokens = TokenChecker(model, max_length, template, image_folder) if model is not None else None
    report = CheckReport(str(path), str(image_folder) if image_folder is not None else None)
    first_seen: dict[str, int] = {}
    # Samples wait here, in order, until their image check is done: defects stay in sample order and
    # at most `window` samples are held, so memory stays flat however long the file is.
    pending: deque[tuple[list[Defect], int, int, str | None, Future | None]] = deque()
    window = 64 * max(workers, 1)

    def settle(block: bool) -> None:
        while pending and (block or len(pending) > window or pending[0][4] is None or pending[0][4].done()):
            found, at, index, sid, future = pending.popleft()
            problem = future.result() if future is not None else None
            if problem is not None:
                found.insert(at, Defect(index, sid, "image", *problem))
            report.defects.extend(found)

    try:
        with _Progress(reader, report, images, enabled=progress) as bar:
            for record in reader:
                report.samples += 1
                if record.error is not None and record.value is None:
                    stop = "; reading stopped here, later samples were not checked" if reader.stopped_early else ""
                    pending.append(([Defect(record.index, None, record.field, record.kind, record.error + stop)],
                                    0, record.index, None, None))
                    settle(block=False)
                    continue
                sample = record.value
                found = check_sample(record.index, sample)
                if record.error is not None:  # decoded, but holds text no later step can handle
                    found.insert(0, Defect(record.index, sample_id(sample), record.field, record.kind, record.error))
                sid, future, at = None, None, 0
                if isinstance(sample, dict):
                    _count(report, sample)
                    sid = sample_id(sample)
                    if sid is not None:
                        if sid in first_seen:
                            found.append(Defect(record.index, sid, "id", "duplicate_id",
                                                f"id {sid!r} already used by sample {first_seen[sid]}"))
                        else:
                            first_seen[sid] = record.index
                    image = sample.get("image")
                    if images is not None and isinstance(image, str) and image.strip() and \
                            not any(d.field == "image" for d in found):
                        future, at = images.submit(image), len(found)
                    if tokens is not None and not any(blocks_encoding(d) for d in found):
                        long = tokens.check(record.index, sample)
                        if long is not None:
                            found.append(long)
                pending.append((found, at, record.index, sid, future))
                settle(block=False)
                bar.advance()
            settle(block=True)
    finally:
        if images is not None:
            images.close()
    report.stopped_early = reader.stopped_early
    report.images_checked = len(images.cache) if images is not None else 0
    report.tokens = tokens.finish() if tokens is not None else None
    return report


def _count(report: CheckReport, sample: dict[str, Any]) -> None:
    if sample.get("image") is not None:
        report.with_image += 1
    else:
        report.text_only += 1
    if isinstance(sample.get("conversations"), list):
        report.turns += len(sample["conversations"])


class _Progress:
    """A rich bar on stderr (bytes read, samples/s, images/s) for interactive runs; silent otherwise."""

    def __init__(self, reader: SampleReader, report: CheckReport, images: ImageChecker | None,
                 enabled: bool) -> None:
        self.reader, self.report, self.images, self.bar, self.step = reader, report, images, None, 0
        if enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            from llava_cluster.console import err_console

            self.bar = Progress(
                TextColumn("checking"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                TextColumn("{task.fields[samples]} samples"), TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(), console=err_console, transient=True,
            )

    def __enter__(self) -> _Progress:
        if self.bar is not None:
            self.bar.start()
            self.task = self.bar.add_task("check", total=self.reader.size or 1, samples=0, rate="")
        return self

    def advance(self) -> None:
        self.step += 1
        if self.bar is not None and self.step % 500 == 0:
            elapsed = self.bar.tasks[0].elapsed or 1e-9
            images = len(self.images.cache) if self.images is not None else 0
            self.bar.update(self.task, completed=self.reader.bytes_read, samples=self.report.samples,
                            rate=f"{self.report.samples / elapsed:,.0f} samples/s, {images / elapsed:,.0f} images/s")

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


def render(report: CheckReport, cap: int = PRINT_CAP) -> None:
    """Defects grouped by sample order (at most `cap` per kind), then a summary table."""
    from rich.markup import escape
    from rich.table import Table

    from llava_cluster.console import console

    shown: Counter[str] = Counter()
    for d in report.defects:
        shown[d.kind] += 1
        if shown[d.kind] > cap:
            continue
        who = f"sample {d.index}" + (f" (id {d.id!r})" if d.id is not None else "")
        console.print(f"[red]{d.kind}[/] {escape(who)} [bold]{escape(d.field)}[/]: {escape(d.message)}",
                      highlight=False, soft_wrap=True)
    for kind, total in report.counts.items():
        if total > cap:
            console.print(f"[dim]… and {total - cap} more {kind}[/]", highlight=False)

    table = Table(title=f"data check: {report.path}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("samples", f"{report.samples:,}")
    table.add_row("with image", f"{report.with_image:,}")
    table.add_row("text-only", f"{report.text_only:,}")
    table.add_row("turns", f"{report.turns:,}")
    table.add_row("image files checked",
                  f"{report.images_checked:,}" if report.image_folder else "skipped (no --image-folder)")
    if report.tokens:
        t = report.tokens
        table.add_row(f"over --max-length {t['max_length']}", f"{t['over_limit']:,}")
        table.add_row("tokens lost to truncation", f"{t['lost_tokens']:,}")
        table.add_row("longest sample (tokens)", f"{t['longest']:,}")
    table.add_row("samples with defects", f"[{'red' if report.defects else 'green'}]{report.defective_samples:,}")
    for kind, total in report.counts.items():
        table.add_row(f"  {kind}", f"[red]{total:,}")
    console.print(table)
    if report.stopped_early:
        console.print("[yellow]The file is not valid JSON past the error above: fix it and run again.[/]")
    console.print("[green]clean[/]" if not report.defects else
                  f"[red]{len(report.defects):,} defect(s) in {report.defective_samples:,} sample(s)[/]")
