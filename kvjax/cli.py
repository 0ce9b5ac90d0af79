"""The `kvjax` command line: convert checkpoints and generate text."""

from __future__ import annotations

import argparse
import sys
import warnings

from kvjax.checkpoint import CheckpointError, bundled_models

# CPU backends cannot donate buffers; the warning says nothing actionable to a CLI user.
warnings.filterwarnings("ignore", message="Some donated buffers were not usable")


def _default_model() -> str:
    names = bundled_models()
    if not names:
        raise CheckpointError("no --model given and no bundled model is installed; pass --model DIR")
    return names[0]


def _convert(args) -> None:
    from checkpoints_convert import convert

    out = convert(args.hf_dir, args.out_dir, dtype=args.dtype)
    print(f"wrote {out}")


def _generate(args) -> None:
    import jax.numpy as jnp
    import numpy as np

    import kvjax
    from kvjax.checkpoint import load

    m = load(args.model or _default_model(), dtype=jnp.dtype(args.dtype))
    if m.tokenizer is None:
        raise CheckpointError(f"{args.model}: the checkpoint has no tokenizer.json, so text cannot be encoded")
    text = args.prompt
    ids = m.tokenizer.encode_chat([{"role": "user", "content": text}]) if args.chat else m.tokenizer.encode(text)
    out = np.asarray(kvjax.generate(
        m, [ids], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, seed=args.seed, chunk_size=args.chunk_size,
    ))[0]
    eos = set(m.config.eos_token_ids)
    stop = next((i for i, t in enumerate(out) if int(t) in eos), len(out))
    print(m.tokenizer.decode(out[:stop]))


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="kvjax", description="KV-cache compression for long-context LLMs in JAX")
    sub = root.add_subparsers(dest="command", required=True)

    convert = sub.add_parser("convert", help="Hugging Face safetensors checkpoint -> kvjax checkpoint")
    convert.add_argument("hf_dir")
    convert.add_argument("out_dir")
    convert.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                         help="storage dtype (default: the checkpoint's own)")
    convert.set_defaults(run=_convert)

    generate = sub.add_parser("generate", help="complete a prompt")
    generate.add_argument("--model", help="checkpoint directory or bundled model name (default: bundled)")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--top-k", type=int, default=0)
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--chunk-size", type=int, default=512)
    generate.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    generate.set_defaults(run=_generate)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"kvjax {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
