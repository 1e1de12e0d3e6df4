"""Throughput of `tinygpt tokenize` against its ceiling and against a nanoGPT-style `datasets.map` pipeline.

A benchmark, not a test (issue #3). It builds a JSON-lines corpus of at least `--mb` MB from the embedded
Shakespeare works (paragraphs grouped into 1-8 KB documents, shuffled and repeated with a fixed seed), then
runs, each in its own process so peak RSS is its own, on the same documents with the same thread count:

* ceiling   raw tiktoken `encode_ordinary_batch(docs, num_threads=W)` over documents already in memory
            (only the encode calls are timed: no reading, no JSON, no writing);
* tinygpt   `tinygpt tokenize corpus.jsonl --workers W`, the whole command as a user runs it (process start,
            counting, planning, reading, encoding, hashing, writing, fsync);
* datasets  what nanoGPT's `data/openwebtext/prepare.py` does: `load_dataset("json")`, `.map(encode, num_proc=W)`,
            then the ids copied into a uint16 memmap in shards (its own cache folder, so nothing is reused).

Usage: python bench/tokenize_throughput.py [--mb 50] [--workers N] [--skip-datasets]
Prints a Markdown table of MB/s, tokens/s, peak RSS and the ratios, by wall time (best of `--repeat`
interleaved runs) and by CPU time (user + system, child processes included), which a busy shared machine
disturbs much less than wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TASK_BYTES = 4 * 1024 * 1024  # text per encode_ordinary_batch call in the ceiling run


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its children that have been waited for."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def build_corpus(path: Path, megabytes: float, seed: int = 0) -> tuple[int, int]:
    """Write a JSON-lines corpus of at least `megabytes` MB; return (documents, text bytes)."""
    from tinygpt_cli.sources import embedded_source

    paragraphs = []
    for doc_file in embedded_source().files:
        paragraphs += [p for p in doc_file.path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    rng = random.Random(seed)
    documents: list[str] = []
    current: list[str] = []
    size, target = 0, rng.randint(1000, 8000)
    for paragraph in paragraphs:
        current.append(paragraph)
        size += len(paragraph) + 2
        if size >= target:
            documents.append("\n\n".join(current))
            current, size, target = [], 0, rng.randint(1000, 8000)
    if current:
        documents.append("\n\n".join(current))
    count = text_bytes = 0
    with open(path, "w", encoding="utf-8") as handle:
        while text_bytes < megabytes * 1e6:
            rng.shuffle(documents)
            for document in documents:
                handle.write(json.dumps({"text": document}) + "\n")
                count += 1
                text_bytes += len(document.encode("utf-8"))
    return count, text_bytes


# ----------------------------------------------------------------------------------------------- the runs
def run_ceiling(corpus: Path, workers: int) -> dict:
    from tinygpt_cli.tokenizer import get_encoding

    encoding = get_encoding()
    with open(corpus, encoding="utf-8") as handle:
        documents = [json.loads(line)["text"] for line in handle]
    batches, batch, size = [], [], 0
    for document in documents:
        batch.append(document)
        size += len(document)
        if size >= TASK_BYTES:
            batches.append(batch)
            batch, size = [], 0
    batches.append(batch)
    encoding.encode_ordinary("warm up")
    tokens = 0
    started, cpu = time.perf_counter(), cpu_seconds()
    for batch in batches:
        tokens += sum(len(ids) for ids in encoding.encode_ordinary_batch(batch, num_threads=workers))
    return {"seconds": time.perf_counter() - started, "cpu": cpu_seconds() - cpu, "tokens": tokens + len(documents)}


def run_datasets(corpus: Path, workers: int, scratch: Path) -> dict:
    import datasets
    import numpy as np
    from datasets import load_dataset

    from tinygpt_cli.tokenizer import EOT_ID, get_encoding

    encoding = get_encoding()

    def encode(example: dict) -> dict:
        ids = encoding.encode_ordinary(example["text"])
        ids.append(EOT_ID)
        return {"ids": ids, "len": len(ids)}

    datasets.disable_progress_bars()
    cache = tempfile.mkdtemp(prefix="hf-cache-", dir=scratch)  # fresh each run: a cache hit would skip the work
    started, cpu = time.perf_counter(), cpu_seconds()
    dataset = load_dataset("json", data_files=str(corpus), split="train", cache_dir=cache)
    tokenized = dataset.map(encode, remove_columns=["text"], num_proc=workers, desc="tokenizing")
    total = int(np.sum(tokenized["len"], dtype=np.uint64))
    out = np.memmap(scratch / "datasets-train.bin", dtype=np.uint16, mode="w+", shape=(total,))
    shards, index = 64, 0
    for shard in range(shards):
        part = tokenized.shard(num_shards=shards, index=shard, contiguous=True).with_format("numpy")
        ids = np.concatenate(part["ids"])
        out[index : index + len(ids)] = ids
        index += len(ids)
    out.flush()
    result = {"seconds": time.perf_counter() - started, "cpu": cpu_seconds() - cpu, "tokens": total}
    del out, tokenized, dataset
    shutil.rmtree(cache, ignore_errors=True)
    return result


def run_tinygpt(corpus: Path, workers: int, scratch: Path) -> dict:
    env = dict(os.environ, TINYGPT_HOME=str(scratch / "home"))
    started, cpu = time.perf_counter(), cpu_seconds()
    done = subprocess.run(
        [sys.executable, "-m", "tinygpt_cli", "tokenize", str(corpus), "--workers", str(workers), "--name", "bench",
         "--restart", "--json"],
        env=env, capture_output=True, text=True,
    )
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    if done.returncode:
        raise SystemExit(f"tinygpt tokenize failed:\n{done.stderr}")
    meta = json.loads(done.stdout)
    tokens = meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"]
    return {"seconds": seconds, "cpu": cpu, "tokens": tokens, "library_seconds": meta["seconds"]}


# ----------------------------------------------------------------------------------------------- harness
def measure(mode: str, corpus: Path, workers: int, scratch: Path) -> dict:
    """Run one mode in a child process; add its peak RSS (MiB)."""
    child = subprocess.Popen(
        [sys.executable, __file__, "--child", mode, "--corpus", str(corpus), "--workers", str(workers),
         "--scratch", str(scratch)],
        stdout=subprocess.PIPE, text=True,
    )
    assert child.stdout is not None
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise SystemExit(f"{mode} run failed (exit {child.returncode})")
    result = json.loads(output.strip().splitlines()[-1])
    result["peak_rss_mib"] = usage.ru_maxrss / 1024  # Linux reports KiB
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=50.0, help="corpus size in MB of text (at least)")
    parser.add_argument("--workers", type=int, default=None, help="threads/processes (default: all cores)")
    parser.add_argument("--skip-datasets", action="store_true", help="skip the datasets.map pipeline")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved runs of each; the best is reported")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    args = parser.parse_args()

    from tinygpt_cli.sources import available_cpus

    workers = args.workers or available_cpus()
    if args.child:
        corpus, scratch = Path(args.corpus), Path(args.scratch)
        runner = {"ceiling": lambda: run_ceiling(corpus, workers),
                  "tinygpt": lambda: run_tinygpt(corpus, workers, scratch),
                  "datasets": lambda: run_datasets(corpus, workers, scratch)}[args.child]
        print(json.dumps(runner()))
        return

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="tinygpt-bench-") as tmp:
        scratch = Path(tmp)
        corpus = scratch / "corpus.jsonl"
        documents, text_bytes = build_corpus(corpus, args.mb)
        print(f"corpus: {documents:,} documents, {text_bytes / 1e6:.1f} MB of text, {workers} worker(s), "
              f"{os.cpu_count()} CPU(s)", flush=True)
        modes = ["ceiling", "tinygpt"] + ([] if args.skip_datasets else ["datasets"])
        results: dict[str, dict] = {}
        for _ in range(args.repeat):
            for mode in modes:  # interleaved, so load on a shared machine hits all modes alike
                result = measure(mode, corpus, workers, scratch)
                print(f"  {mode}: {result['seconds']:.2f}s", flush=True)
                if mode not in results or result["seconds"] < results[mode]["seconds"]:
                    results[mode] = result
        tokens = {mode: r["tokens"] for mode, r in results.items()}
        if len(set(tokens.values())) != 1:
            raise SystemExit(f"the pipelines disagree on the token count: {tokens}")
        ceiling = results["ceiling"]["seconds"]
        print()
        ceiling_cpu = results["ceiling"]["cpu"]
        print("| pipeline | wall s | MB/s | tokens/s | peak RSS | vs ceiling | CPU s | vs ceiling, CPU |")
        print("|---|---|---|---|---|---|---|---|")
        for mode, r in results.items():
            print(f"| {mode} | {r['seconds']:.2f} | {text_bytes / r['seconds'] / 1e6:.2f} | "
                  f"{r['tokens'] / r['seconds'] / 1e6:.2f}M | {r['peak_rss_mib']:.0f} MiB | "
                  f"{ceiling / r['seconds']:.2f}× | {r['cpu']:.2f} | {ceiling_cpu / r['cpu']:.2f}× |")
        tiny = results["tinygpt"]
        print(f"\ntinygpt tokenize inside the library (without process start-up): {tiny['library_seconds']:.2f}s, "
              f"{ceiling / tiny['library_seconds']:.2f}× the ceiling")
        if "datasets" in results:
            data_run = results["datasets"]
            print(f"tinygpt vs datasets.map: {data_run['seconds'] / tiny['seconds']:.2f}× faster (wall), "
                  f"{data_run['cpu'] / tiny['cpu']:.2f}× less CPU")


if __name__ == "__main__":
    main()
