"""What one dependent link of a decode step costs on a GPU, with no weights to read: the question that decides
how the fused decode step (`kernels.FusedDecodeStep`) could get past ~34% of an H100's memory bandwidth.

A batch-1 step of GPT-2 small is a chain of 62 kernels, each needing all of the one before (docs/performance.md:
3.3-3.5 us a link, of which its bytes at the peak are about 1 us). Two ways to pay less per link:

* kernels, as now: 62 launches in a CUDA graph, with or without programmatic dependent launch (PDL);
* one persistent kernel whose programs (one per multiprocessor) meet at a grid-wide barrier in memory instead:
  an atomic arrive, then polling until every program has arrived.

Both chains here do the same tiny dependent work per link: every program reads a value another program wrote in
the link before and writes its own. The time per link is then what a link costs beyond its bytes. If the barrier
is well under the kernel boundary, a persistent decode kernel is worth writing; if not, it is not.

The barrier chain needs all its programs resident at once (one per multiprocessor, 4 warps: nothing else runs).
The result is checked: a barrier that let a program read too early would leave a wrong value.

    python bench/link_latency.py --links 62
"""

import argparse

import torch
import triton
import triton.language as tl
from persistent_decode import _arrive, _wait  # bench/ is on sys.path when run as a script

from tinygpt_cli import kernels

gdc_wait, gdc_launch_dependents = kernels.gdc_wait, kernels.gdc_launch_dependents


@triton.jit
def _link(values, n, PDL: tl.constexpr):
    """One link as a kernel: values[p] = values[(p + 1) % n] + 1 needs the kernel before to have finished, so
    each program reads its neighbour's value into a second half of the buffer, and the next kernel swaps halves."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    p = tl.program_id(0)
    value = tl.load(values + (p + 1) % n, cache_modifier=".cg")
    tl.store(values + n + p, value + 1)


@triton.jit
def _copy_back(values, n, PDL: tl.constexpr):
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    p = tl.program_id(0)
    tl.store(values + p, tl.load(values + n + p, cache_modifier=".cg"))


@triton.jit
def _grid_barrier(counter, target):
    """Every program of the grid arrives (one atomic, after all of this program's threads have stored), then
    waits until `target` arrivals were counted; what the others stored before arriving is then visible. The
    barrier of bench/persistent_decode.py, whose stages split the two halves."""
    _arrive(counter, True)
    _wait(counter, target, True)


@triton.jit
def _persistent(values, counter, n, links):
    """`links` links in one kernel: read the neighbour's value, barrier, write it + 1, barrier."""
    p = tl.program_id(0)
    for i in range(links):
        value = tl.load(values + (p + 1) % n, cache_modifier=".cg")
        _grid_barrier(counter, (2 * i + 1) * n)
        tl.store(values + p, value + 1)
        _grid_barrier(counter, (2 * i + 2) * n)


def timed_graph(record, replays: int = 50) -> tuple[float, torch.cuda.CUDAGraph]:
    """(median microseconds of one replay of the CUDA graph that `record()` captures, the graph)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        record()  # warm-up: Triton builds and loads its kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        record()
    times = []
    for _ in range(replays):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(begin.elapsed_time(end) * 1e3)
    return sorted(times)[len(times) // 2], graph


def measured(record, values: torch.Tensor, sms: int, pairs: int) -> tuple[float, bool]:
    """(median microseconds of a graph of `record()`, whether one more replay of that same graph, the thing timed,
    leaves every value at `pairs`)."""
    us, graph = timed_graph(record)
    values.zero_()
    graph.replay()
    torch.cuda.synchronize()
    return us, bool((values[:sms] == pairs).all())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--links", type=int, default=62)
    args = parser.parse_args()
    pairs = args.links // 2  # a link reads, the next writes back
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    pdl = kernels.uses_pdl(torch.cuda.get_device_capability())
    print(f"{torch.cuda.get_device_name()}, {sms} SMs, Triton {triton.__version__}, PDL available: {pdl}; "
          f"{2 * pairs} links")
    values = torch.zeros(2 * sms, dtype=torch.int32, device="cuda")
    for use_pdl in (False, True) if pdl else (False,):
        options = {"num_warps": 4, "PDL": use_pdl, **({"launch_pdl": True} if use_pdl else {})}

        def chain(options=options):
            for _ in range(pairs):
                _link[(sms,)](values, sms, **options)
                _copy_back[(sms,)](values, sms, **options)

        us, ok = measured(chain, values, sms, pairs)
        print(f"  kernels in a graph, PDL {use_pdl!s:5s}: {us / (2 * pairs):5.2f} us a link ({us:.1f} us in all); "
              f"result {'right' if ok else 'WRONG'}", flush=True)
    counter = torch.zeros(1, dtype=torch.int32, device="cuda")

    cooperative = {"launch_cooperative_grid": True}  # the driver refuses a grid that cannot all be resident

    def persistent():
        counter.zero_()
        _persistent[(sms,)](values, counter, sms, pairs, num_warps=4, **cooperative)

    try:
        us, ok = measured(persistent, values, sms, pairs)
    except RuntimeError as exc:  # a CUDA graph that cannot capture a cooperative launch: a plain one (it fits)
        print(f"  (cooperative launch in a graph failed: {str(exc).splitlines()[0][:100]}; timed without it)")
        cooperative.clear()
        us, ok = measured(persistent, values, sms, pairs)
    ok = ok and int(counter[0]) == 2 * pairs * sms  # every program arrived at every barrier, once
    print(f"  one persistent kernel, grid barriers: {us / (2 * pairs):5.2f} us a barrier ({us:.1f} us in all, the "
          f"counter's reset included); result {'right' if ok else 'WRONG'}", flush=True)


if __name__ == "__main__":
    main()
