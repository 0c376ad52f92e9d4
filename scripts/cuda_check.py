"""Device and dtype check of every model role of the tiny zoo on a GPU machine.

`python scripts/cuda_check.py` (dry run on a laptop: `--device cpu`, where weights stay float32 by design). Builds
the tiny zoo if needed, loads each role through its Dagster resource on `--device` with `--dtype`, runs one forward
pass as the project uses the role, checks every parameter sits on the device in the dtype the loader gives the role
(`loaders.role_dtype`: the evaluation encoders `dino` and `eval_clip` always in float32; the modules a library keeps
in float32 on purpose left out), prints a table and exits 1 when a role fails.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout without installing

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _image(w=64, h=64):
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _to(inputs, h):
    """Tensors to the handle's device; floating ones to its dtype."""
    return {k: (v.to(h.device, h.dtype) if v.is_floating_point() else v.to(h.device)) if hasattr(v, "to") else v
            for k, v in inputs.items()}


def _causal_lm(h):
    enc = _to(h.tokenizer(["a red cat on a table"], return_tensors="pt"), h)
    out = h.model.generate(**enc, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    return f"generate {tuple(out.shape)}"


def _vlm(h):
    text = h.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is this a cat?"}]}],
        add_generation_prompt=True)
    out = h.model(**_to(h.processor(images=[_image()], text=[text], return_tensors="pt"), h))
    return f"logits {tuple(out.logits.shape)}"


def _flux(h):
    import torch

    kw = dict(image=_image(), max_area=64 * 64, _auto_resize=False) if "Kontext" in type(h.pipe).__name__ else {}
    out = h.pipe(prompt="a photo of a cat", height=64, width=64, num_inference_steps=2, max_sequence_length=32,
                 generator=torch.Generator(h.device).manual_seed(0), output_type="np", **kw)
    return f"image {out.images.shape}"


def _detector(h):
    image = _image(80, 60)
    inputs = h.processor(images=image, text=[["a cat", "a dog"]], return_tensors="pt")
    out = h.model(**_to(inputs, h))
    res = h.processor.post_process_grounded_object_detection(
        out, inputs["input_ids"].to(h.device), threshold=0.0, text_threshold=0.0, target_sizes=[image.size[::-1]])
    return f"boxes {tuple(res[0]['boxes'].shape)}"


def _segmenter(h):
    inputs = h.processor(images=_image(80, 96), input_boxes=[[[10, 20, 60, 80]]], return_tensors="pt")
    t = _to(inputs, h)
    out = h.model(pixel_values=t["pixel_values"], input_boxes=t["input_boxes"], multimask_output=False)
    masks = h.processor.post_process_masks(out.pred_masks.float().cpu(), inputs["original_sizes"])[0]
    return f"mask {tuple(masks.shape)}"


def _clip(h):
    image = h.preprocess(_image()).unsqueeze(0).to(h.device, h.dtype)
    fi = h.model.encode_image(image, normalize=True)
    ft = h.model.encode_text(h.tokenizer(["a cat"]).to(h.device), normalize=True)
    return f"image {tuple(fi.shape)} text {tuple(ft.shape)}"


def _vision(h):
    out = h.model(**_to(h.processor(images=[_image(256, 256)], return_tensors="pt"), h))
    return f"tokens {tuple(out.last_hidden_state.shape)}"


def _dino(h):
    """timm's ViT as the evaluation runs it: the DINO protocol's preprocessing, the CLS token of `forward_features`."""
    from music_dagster.evaluation.metrics import dino_preprocess

    cls = h.model.forward_features(dino_preprocess(_image(256, 256)).unsqueeze(0).to(h.device, h.dtype))[:, 0]
    return f"CLS {tuple(cls.shape)}"


def _unet(h):
    import torch

    x = torch.randn(1, 3, 32, 32, device=h.device, dtype=h.dtype)
    cond = torch.randn(1, 64, h.unet.config.cross_attention_dim, device=h.device, dtype=h.dtype)
    eps = h.unet(x, torch.tensor([10], device=h.device), encoder_hidden_states=cond).sample
    return f"noise {tuple(eps.shape)}"


FORWARD = {
    "llm": _causal_lm, "vlm": _vlm, "t2i": _flux, "i2i": _flux, "detector": _detector, "segmenter": _segmenter,
    "clip": _clip, "dino": _dino, "eval_clip": _clip, "music_llm": _causal_lm, "music_vision": _vision,
    "music_unet": _unet, "select_clip": _clip,
}


def misplaced(h, device_type: str, dtype) -> list[str]:
    """Parameters not on `device_type` or not in `dtype`, leaving out a library's deliberate float32 modules."""
    import torch

    bad = []
    for module in h.modules():
        keep = set(getattr(module, "_keep_in_fp32_modules", None) or ()) | \
            set(getattr(module, "_keep_in_fp32_modules_strict", None) or ())
        for name, p in module.named_parameters():
            kept = p.dtype == torch.float32 and keep & set(name.split("."))
            if p.device.type != device_type or (p.is_floating_point() and p.dtype != dtype and not kept):
                bad.append(f"{type(module).__name__}.{name} {p.device} {p.dtype}")
    return bad


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu", "auto"])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--root", help="zoo folder (default: the project's models/tiny)")
    args = parser.parse_args(argv)

    import torch

    from music_dagster.config import ROLES, default_config
    from music_dagster.resources.models import RESOURCE_CLASSES
    from music_dagster.zoo.loaders import role_dtype
    from music_dagster.zoo.tiny import ensure_zoo

    torch.set_num_threads(max(1, min(8, os.cpu_count() or 1)))
    t0 = time.perf_counter()
    folders = ensure_zoo(seed=default_config().seed, root=args.root)  # the project's seed: never a rebuild
    print(f"zoo ready in {time.perf_counter() - t0:.1f} s at {next(iter(folders.values())).parent}")
    if torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")

    failed = 0
    print(f"{'role':<13}{'class':<36}{'device':<8}{'dtype':<16}{'load s':>7}{'fwd s':>7}  result")
    for role in ROLES:
        res = RESOURCE_CLASSES[role](checkpoint=str(folders[role]), device=args.device, dtype=args.dtype)
        try:
            t0 = time.perf_counter()
            h = res.load()
            t1 = time.perf_counter()
            if role not in FORWARD:
                raise AssertionError(f"scripts/cuda_check.py has no forward pass for {role}")
            with torch.inference_mode():
                result = FORWARD[role](h)
            if h.device.type == "cuda":
                torch.cuda.synchronize()
            t2 = time.perf_counter()
            expected = role_dtype(role, args.dtype, h.device)
            bad = misplaced(h, h.device.type, expected)
            if h.dtype != expected or bad:
                raise AssertionError(f"handle dtype {h.dtype}, expected {expected}; misplaced: {bad[:3]}")
            cls = type(h.model or h.pipe or h.unet).__name__
            print(f"{role:<13}{cls:<36}{h.device.type:<8}{str(h.dtype):<16}{t1 - t0:>7.2f}{t2 - t1:>7.2f}  {result}")
        except Exception as e:  # report every role, then fail
            failed += 1
            print(f"{role:<13}FAILED: {type(e).__name__}: {e}")
            traceback.print_exc(limit=3)
        finally:
            res.unload()
    if torch.cuda.is_available():
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    print("all roles OK" if not failed else f"{failed} role(s) failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
