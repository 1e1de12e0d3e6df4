"""Generation throughput: tinygpt with its KV cache vs tinygpt without vs Hugging Face transformers'
`GPT2LMHeadModel.generate` (with its own KV cache), on the same random weights, in the same run.

The workload of issue #5: 256 new tokens from a 16-token prompt, batch 1, greedy; fp32 on CPU, the weights cast to
bf16 on CUDA (where tinygpt decodes with its fused Triton kernels by default, each step a CUDA graph). Each shape
keeps the preset's layers, heads and width but gets a 1024-position table, so that the 272 tokens fit one window
(Hugging Face's GPT-2 cannot slide a window). tinygpt's weights are stored as `tinygpt generate` loads them on CPU
(column-major, see `sample.decode_layout`). The Hugging Face model is built from tinygpt's state dict: the same
parameter names, its Conv1D weights transposed, the vocabulary cut to GPT-2's 50257 (tinygpt never samples the
padding ids either), and the greedy tokens of all are compared. Rounds alternate between the contenders so that
machine noise hits all alike, and each one's best round is reported (noise on a shared machine only ever slows a run
down).

On CUDA the first contender is the default, tinygpt's own fused Triton kernels (`generate(fused=True)`: five
kernels a layer), in a call that builds its decoder and captures its CUDA graph (as the first call of a process
does: every contender's timed call starts with no decoder kept from another); then the same in a call after one
with the same settings (a loop of calls: it takes that call's decoder, nothing allocated or captured), the step
compiled by torch.compile (`--compile on`), the same with inductor's
coordinate_descent_tuning (`sample.DECODE_COMPILE_OPTIONS`: each one-row matmul a tuned Triton reduction instead of
a cuBLAS call), and PyTorch's eager step replayed as CUDA graphs (`--no-fused`). `--skip` leaves some out.

On CPU tinygpt's default is shown with and without look-ahead (`sample.PromptLookup`: guesses from earlier text,
checked in one pass), and Hugging Face's generate with and without its own prompt lookup. What look-ahead gains
depends on how repetitive the text is: greedy decoding of random weights loops at once (the best case), so
`--run` measures a trained model on a real prompt too.

    python bench/generate_throughput.py                                   # micro and small, this machine
    python bench/generate_throughput.py --temperature 0.8 --top-k 200     # sampled, tinygpt's defaults
    python bench/generate_throughput.py --device cuda --shapes small      # + memory-bandwidth utilisation
    python bench/generate_throughput.py --run RUN --new-tokens 100        # trained weights, a Shakespeare prompt
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from tinygpt_cli import sample
from tinygpt_cli.config import PRESETS, ModelConfig
from tinygpt_cli.model import GPT
from tinygpt_cli.sample import GenerationStats, decode_layout, generate
from tinygpt_cli.tokenizer import EOT_ID, VOCAB_SIZE

CONTEXT = 1024
TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Peak memory bandwidth in GB/s by device name (first match), for the utilisation figure on GPUs.
PEAK_BANDWIDTH_GBS = {"H200": 4800, "H100 PCIe": 2000, "H100": 3350, "A100-SXM4-80GB": 2039, "A100": 1555,
                      "L40S": 864, "A10": 600, "L4": 300, "4090": 1008, "3090": 936}


def build_hf(model: GPT):
    """A GPT2LMHeadModel holding `model`'s weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = model.config
    hf_cfg = GPT2Config(
        vocab_size=VOCAB_SIZE, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, activation_function="gelu_new",
        layer_norm_epsilon=1e-5, bos_token_id=EOT_ID, eos_token_id=EOT_ID, tie_word_embeddings=True,
    )
    hf_cfg._attn_implementation = "sdpa"
    hf = GPT2LMHeadModel(hf_cfg).eval()
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith(TRANSPOSED):
            tensor = tensor.t()
        if name in ("transformer.wte.weight", "lm_head.weight"):
            tensor = tensor[:VOCAB_SIZE]
        state[name] = tensor.contiguous()
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all(".attn.bias" in k or ".attn.masked_bias" in k for k in missing), (missing, unexpected)
    hf.tie_weights()
    return hf


def check_same_logits(model: GPT, hf, device: torch.device) -> float:
    idx = torch.randint(0, VOCAB_SIZE, (1, 32), device=device)
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf(input_ids=idx).logits
    return float((ours[..., :VOCAB_SIZE].float() - theirs.float()).abs().max())


def contenders(model: GPT, hf, prompt: list[int], device: torch.device, compile_decode: bool,
               temperature: float = 0.0, top_k: int = 0) -> dict[str, Callable[[int], list[int]]]:
    """name -> run(new_tokens) -> the tokens (greedy at temperature 0, else sampled from seed 0)."""
    from transformers import GenerationConfig

    prompt_ids = torch.tensor([prompt], device=device)

    def ours(use_cache: bool, compile: bool = False, lookahead: bool | None = None, static: bool | None = None,
             graphs: bool | None = None, inductor: dict | None = None, fused: bool = False, later: bool = False,
             ) -> Callable[[int], list[int]]:
        """`later`: each timed call follows an untimed one with the same settings (`run.prepare`), as in a loop
        of calls (`tinygpt generate`'s prompt loop, a library's), which takes the decoder that one built
        (`sample._KeptDecoder`: no allocation, no graph capture)."""
        def run(new_tokens: int) -> list[int]:
            stats = GenerationStats()
            sample.DECODE_COMPILE_OPTIONS = inductor or {}
            try:
                tokens = [int(t[0]) for t in generate(model, prompt, new_tokens, temperature=temperature,
                                                      top_k=top_k, seed=0, use_cache=use_cache, compile=compile,
                                                      lookahead=lookahead, static_cache=static, graphs=graphs,
                                                      fused=fused, stats=stats)]
            finally:
                sample.DECODE_COMPILE_OPTIONS = {}
            run.stats = stats
            return tokens
        if later:
            run.prepare = lambda: run(4)  # (a first token, then chunks of steps: the graph is captured)
        return run

    def theirs(lookup: int = 0) -> Callable[[int], list[int]]:
        def run(new_tokens: int) -> list[int]:
            sampled = {"do_sample": True, "temperature": temperature, "top_k": top_k or None} if temperature else \
                {"do_sample": False}
            if lookup:
                sampled["prompt_lookup_num_tokens"] = lookup
            config = GenerationConfig(max_new_tokens=new_tokens, num_beams=1, use_cache=True, pad_token_id=EOT_ID,
                                      eos_token_id=None, **sampled)  # no end token: always new_tokens
            torch.manual_seed(0)
            with torch.inference_mode():
                out = hf.generate(input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids),
                                  generation_config=config)
            assert out.shape[1] == len(prompt) + new_tokens
            return out[0, len(prompt):].tolist()
        return run

    if compile_decode:  # CUDA: steps replayed as CUDA graphs (compiled: torch.compile's); look-ahead is off there
        return {"tinygpt, KV cache, fused Triton kernels": ours(True, fused=True),
                "tinygpt, KV cache, fused Triton kernels, a later call": ours(True, fused=True, later=True),
                "tinygpt, KV cache, compiled": ours(True, compile=True),
                "tinygpt, KV cache, compiled, CD-tuned GEMV": ours(True, compile=True,
                                                                   inductor={"coordinate_descent_tuning": True}),
                "tinygpt, KV cache": ours(True),
                "tinygpt, KV cache, no CUDA graphs": ours(True, static=False),
                "tinygpt, no cache": ours(False), "HF generate, KV cache": theirs()}
    return {"tinygpt, KV cache + look-ahead": ours(True), "tinygpt, KV cache": ours(True, lookahead=False),
            "tinygpt, no cache": ours(False), "HF generate, KV cache": theirs(),
            "HF generate, KV cache + prompt lookup": theirs(lookup=10)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_shape(shape: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
    if args.run:  # trained weights and a text prompt
        from tinygpt_cli.sample import encode_prompt, load_model

        model = load_model(args.run, device="cpu", dtype="fp32").model
        prompt = encode_prompt(args.prompt)
        if len(prompt) + args.new_tokens > model.config.block_size:
            raise SystemExit(f"--prompt and --new-tokens must fit the run's context of {model.config.block_size}")
    else:  # random weights, a random prompt
        preset = PRESETS[shape]["model"]
        cfg = ModelConfig(n_layer=preset["n_layer"], n_head=preset["n_head"], n_embd=preset["n_embd"],
                          block_size=CONTEXT)
        torch.manual_seed(0)
        model = GPT(cfg).eval()
        prompt = torch.randint(0, VOCAB_SIZE, (args.prompt_tokens,),
                               generator=torch.Generator().manual_seed(1)).tolist()
    cfg = model.config
    hf = build_hf(model)
    model.to(device=device, dtype=dtype)
    if device.type == "cpu":
        decode_layout(model)  # how `tinygpt generate` loads weights on CPU
    hf.to(device=device, dtype=dtype)
    error = check_same_logits(model, hf, device)
    runs = contenders(model, hf, prompt, device, compile_decode=device.type == "cuda",
                      temperature=args.temperature, top_k=args.top_k)
    skipped = [word.strip() for word in args.skip.split(",") if word.strip()]
    runs = {name: run for name, run in runs.items()
            if name == "tinygpt, KV cache" or not any(word in name for word in skipped)}  # the reference stays
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"\n{shape}: {cfg.n_layer} layers × {cfg.n_embd} wide, {cfg.n_head} heads, "
          f"{model.num_params() / 1e6:.1f}M parameters ({weight_bytes / 1e6:.0f} MB), context {cfg.block_size}; "
          f"max |logits difference| vs HF {error:.1e}")
    estimate: dict[str, float] = {}
    warmup_tokens = min(16, args.new_tokens)
    for name, run in runs.items():  # warm-up (and the compile), timed to spot the slow contenders
        getattr(run, "prepare", sample._KEPT.clear)()  # a decoder kept for this call's settings, or none
        sync(device)
        started = time.perf_counter()
        run(warmup_tokens)
        sync(device)
        estimate[name] = (time.perf_counter() - started) * args.new_tokens / warmup_tokens
    tokens: dict[str, list[int]] = {}
    best: dict[str, float] = {name: float("inf") for name in runs}
    for round_ in range(args.rounds):
        for name, run in runs.items():
            if round_ > 0 and estimate[name] > args.slow_seconds:  # one timed round of a slow contender
                continue
            getattr(run, "prepare", sample._KEPT.clear)()
            sync(device)
            started = time.perf_counter()
            tokens[name] = run(args.new_tokens)
            sync(device)
            best[name] = min(best[name], time.perf_counter() - started)
    reference = tokens["tinygpt, KV cache"]
    default = next(iter(runs))  # what `tinygpt generate` does by default on this device
    cached = args.new_tokens / best[default]
    peak = None
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
        peak = args.peak_bandwidth or next((v for k, v in PEAK_BANDWIDTH_GBS.items() if k in gpu), None)
        print(f"{gpu}: peak memory bandwidth {peak or '?'} GB/s; bandwidth use = weight bytes × tokens/s ÷ peak")
    extra = " bandwidth use |" if peak else ""
    for name, run in runs.items():
        stats = getattr(run, "stats", None)
        if stats is not None and (stats.graph_error or stats.compile_error):
            print(f"{name}: {stats.graph_error or stats.compile_error}")
    if device.type == "cuda":  # where tinygpt's time per call goes: setup before the first token, capture, steady
        print("| tinygpt contender | first token ms | graph capture ms | tokens/s after the first |")
        print("|---|---|---|---|")
        for name, run in runs.items():
            stats = getattr(run, "stats", None)
            if stats is not None:
                print(f"| {name} | {stats.time_to_first_token_s * 1e3:.1f} | {stats.capture_s * 1e3:.1f} | "
                      f"{stats.decode_tokens_per_s:,.1f} |")
    look = getattr(runs[default], "stats", None)
    if look is not None and look.model_passes:
        print(f"look-ahead: {look.model_passes} model passes for {args.new_tokens} tokens, {look.accepted_tokens} of "
              f"{look.guessed_tokens} guessed tokens taken")
    print(f"| contender | tokens/s | ms/token | {default} vs this | same tokens |{extra}")
    print("|---|---|---|---|---|" + ("---|" if peak else ""))
    for name, seconds in best.items():
        rate = args.new_tokens / seconds
        same = "yes" if tokens[name] == reference else "no (another sampler)" if args.temperature and \
            name.startswith("HF") else \
            f"from {next(i for i, (a, b) in enumerate(zip(tokens[name], reference, strict=True)) if a != b)}"
        use = f" {weight_bytes * rate / 1e9 / peak:.0%} |" if peak else ""
        print(f"| {name} | {rate:,.1f} | {1000 / rate:.2f} | {cached / rate:.2f}× | {same} |{use}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="micro,small", help="comma-separated presets (default: micro,small)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default: fp32 on CPU, bf16 on CUDA)")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per contender (the best is kept)")
    parser.add_argument("--slow-seconds", type=float, default=20.0,
                        help="a contender that would take longer per run gets one timed round")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); else sampled")
    parser.add_argument("--top-k", type=int, default=0, help="with --temperature: keep the k likeliest (0 = off)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--run", default=None, help="a trained run or checkpoint instead of random weights")
    parser.add_argument("--prompt", default="ROMEO:\nWhat light through yonder window breaks?\n",
                        help="with --run: the prompt text")
    parser.add_argument("--peak-bandwidth", type=float, default=None, help="GB/s, for the utilisation on a GPU")
    parser.add_argument("--skip", default="", help="comma-separated words: leave out the contenders named with any")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    import transformers

    mode = f"temperature {args.temperature:g}, top-k {args.top_k}" if args.temperature else "greedy"
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {device} {dtype_name}, "
          f"{torch.get_num_threads()} threads; {args.new_tokens} new tokens from {args.prompt_tokens}, batch 1, "
          f"{mode}; best of {args.rounds} rounds (1 for a contender slower than {args.slow_seconds:g} s)")
    for shape in ([args.run] if args.run else args.shapes.split(",")):
        bench_shape(shape.strip(), args, device, dtype)


if __name__ == "__main__":
    main()
