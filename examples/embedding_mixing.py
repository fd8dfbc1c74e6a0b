"""Mixing two words inside the text encoder: half "puppy", half "skunk", then generate.

How CLIP's text encoder reads a prompt:

1. the tokenizer maps each word (or word piece) to an id: in CLIP's vocabulary "puppy" is 6829
   and "skunk" 42194;
2. a lookup table, the *token embedding* (`text_encoder.get_input_embeddings()`, one row of
   `hidden_size` numbers per id), turns each id into a vector;
3. a second table, the *position embedding*, is added so that the transformer knows where each
   token sits (vector for "puppy" + vector for "position 5");
4. the transformer layers let the tokens look at each other (causally: only at earlier tokens)
   and the final LayerNorm gives the 77 vectors the UNet conditions on.

Step 2 is a plain table lookup, so it can be replaced: take the prompt's token vectors, overwrite
the vector of "puppy" with 0.5 * vector("puppy") + 0.5 * vector("skunk") (mix = 1 replaces the
word outright), and let steps 3 and 4 run as usual. Only the token vectors are mixed: the
position vector of that slot stays what it is. The resulting embeddings go to the Stable Diffusion
loop as the prompt embeddings, in place of `encode_prompt(...)`; the unconditional half of
classifier-free guidance still comes from the empty prompt.

Running steps 3-4 on vectors of our own. minidiff's `CLIPTextModel` accepts them directly,
`text_encoder(inputs_embeds=token_vectors)`, adding the position embeddings itself; transformers 5's
`CLIPTextModel.forward` takes only `input_ids`. The route used here works on both: a forward hook
on the token-embedding table makes its lookup return our vectors, and the encoder is then called
with the prompt's ids as usual.

Run:
    python examples/embedding_mixing.py --model runwayml/stable-diffusion-v1-5 \\
        --prompt "a picture of a puppy" --word puppy --other skunk --mix 0.5 --output puppy_skunk.png

Every function that loads something takes `lib` (minidiff by default); tests/test_examples.py
runs this same code with diffusers + transformers and compares.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import stable_diffusion_loop as sd_loop
import torch
from ddpm_loop import Library, save_png

import minidiff


def word_token_id(tokenizer: Any, word: str) -> int:
    """The id of a word that the tokenizer keeps as ONE token (a mix needs one vector per word)."""
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ValueError(f"{word!r} is split into {len(ids)} tokens; pick a word that is a single token")
    return ids[0]


@torch.no_grad()
def encode_token_embeddings(text_encoder: Any, input_ids: torch.Tensor, token_embeds: torch.Tensor) -> torch.Tensor:
    """Run the text encoder with `token_embeds` (B, N, hidden) in place of its own token lookup.

    Position embeddings, the transformer and the final LayerNorm run as usual.
    """
    # the hook's return value replaces the lookup's output
    hook = text_encoder.get_input_embeddings().register_forward_hook(lambda module, args, output: token_embeds)
    try:
        return text_encoder(input_ids)[0]
    finally:
        hook.remove()


@torch.no_grad()
def mixed_prompt_embeddings(
    tokenizer: Any, text_encoder: Any, prompt: str, word: str = "puppy", other: str = "skunk", mix: float = 0.5
) -> torch.Tensor:
    """Encode `prompt` with each occurrence of `word` replaced by (1 - mix) * word + mix * other."""
    input_ids = sd_loop.tokenize(tokenizer, [prompt]).to(text_encoder.device)
    word_id, other_id = word_token_id(tokenizer, word), word_token_id(tokenizer, other)
    if not (input_ids == word_id).any():
        raise ValueError(f"{word!r} does not occur in the prompt {prompt!r}")

    table = text_encoder.get_input_embeddings()
    token_embeds = table(input_ids)  # (1, 77, hidden), before positions are added
    token_embeds[input_ids == word_id] = (1 - mix) * table.weight[word_id] + mix * table.weight[other_id]
    return encode_token_embeddings(text_encoder, input_ids, token_embeds)


def generate(
    lib: Library = minidiff,
    model: str = "runwayml/stable-diffusion-v1-5",
    prompt: str = "a picture of a puppy",
    word: str = "puppy",
    other: str = "skunk",
    mix: float = 0.5,
    steps: int = 30,
    seed: int = 32,
    height: int | None = None,
    width: int | None = None,
    guidance_scale: float = 7.5,
    scheduler: str = "LMSDiscreteScheduler",
    device: str = "cpu",
    progress: bool = False,
) -> np.ndarray:
    """Prompt with a mixed word -> one (1, H, W, 3) image in [0, 1]."""
    c = sd_loop.load_components(lib, model, scheduler, device)
    prompt_embeds = mixed_prompt_embeddings(c.tokenizer, c.text_encoder, prompt, word, other, mix)
    size = (height or c.default_size(), width or c.default_size())
    generator = torch.Generator().manual_seed(seed)
    latents = sd_loop.sample_latents(c, prompt_embeds, steps, generator, *size, guidance_scale, progress)
    return sd_loop.decode_latents(c.vae, latents)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sd_loop.add_common_arguments(parser, default_seed=32)
    parser.set_defaults(steps=30)
    parser.add_argument("--prompt", default="a picture of a puppy")
    parser.add_argument("--word", default="puppy", help="the word of the prompt whose token vector is mixed")
    parser.add_argument("--other", default="skunk", help="the word mixed into it")
    parser.add_argument("--mix", type=float, default=0.5, help="share of --other: 0 = the prompt as is, 1 = replaced")
    parser.add_argument("--scheduler", default="LMSDiscreteScheduler", help="a minidiff scheduler class name")
    parser.add_argument("--output", default="embedding_mixing.png", help="PNG file to write")
    args = parser.parse_args(argv)
    mixing = dict(prompt=args.prompt, word=args.word, other=args.other, mix=args.mix)
    image = generate(minidiff, **mixing, scheduler=args.scheduler, **sd_loop.common_options(args))[0]
    save_png(image, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
