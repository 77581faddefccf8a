"""Build synthetic legacy releases (FastChat delta, Alpaca weight diff, OpenAssistant XOR) of a
LLaMA-shaped model, for measuring `orca-diff convert` ratios (docs/legacy.md).

Usage: python scripts/legacy_ratios.py ROOT HIDDEN LAYERS   (needs orca-diff[torch])
then time `orca-diff apply --format ...` / `orca-diff convert ...` on ROOT's folders."""
import shutil, sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from meta_forms import write_hf_bin  # noqa: E402
from orca_diff.legacy import SafetensorsWriter  # noqa: E402
from orca_diff.synth import FineTune, LlamaShape, write_finetune, write_llama  # noqa: E402
from orca_diff.containers import open_model  # noqa: E402

root, hidden, layers = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
shape = LlamaShape(32000, hidden, hidden * 8 // 3 // 8 * 8, layers, max(1, hidden // 128), max(1, hidden // 128))
root.mkdir(parents=True, exist_ok=True)
base = write_llama(root / "llama", shape, "F16", seed=0, max_shard_bytes=1 << 30)
tuned16 = write_finetune(root / "tuned-f16", shape, base_seed=0, dtype="F16", ft=FineTune(), max_shard_bytes=1 << 30)
tuned32 = write_finetune(root / "tuned-f32-pad", shape, base_seed=0, dtype="F32", ft=FineTune(add_pad_row=True), max_shard_bytes=1 << 30)


def write_diff(out, target, op, dtype):
    b, t = open_model(base), open_model(target)
    out.mkdir()
    infos = [type(i)(i.name, dtype, i.shape) for i in t.tensors.values()]
    w = SafetensorsWriter(out, infos)
    for i in infos:
        w.begin(i.name)
        w.write(op(i.name, b, t).view(np.uint8))
    w.close()
    for n, p in t.extra_files.items():
        if not n.endswith("index.json"):
            shutil.copyfile(p, out / n)


# FastChat: fp16 target - base (make_delta)
write_diff(root / "fastchat-delta", tuned16, lambda n, b, t: t.read(n).view(np.float16) - b.read(n).view(np.float16), "F16")


# Alpaca: fp32 tuned - (fp32 raw + [PAD] mean row), as weight_diff.py make_diff
def alpaca(n, b, t):
    r = torch.from_numpy(b.read(n).view(np.float16).astype(np.float32)).reshape(b.tensors[n].shape)
    if b.tensors[n].shape != t.tensors[n].shape:
        r = torch.cat([r, r.mean(dim=0, keepdim=True)])
    return (torch.from_numpy(t.read(n).view(np.float32)).reshape(t.tensors[n].shape) - r).numpy()


write_diff(root / "alpaca-wdiff", tuned32, alpaca, "F32")

# OpenAssistant: XOR of the .bin files (fp16 fine-tune with added rows, as OA's added tokens)
tuned_pad16 = write_finetune(root / "tuned-f16-pad", shape, base_seed=0, dtype="F16", ft=FineTune(add_pad_row=True), max_shard_bytes=1 << 30)
base_bin = write_hf_bin(base, root / "llama_hf", max_shard_bytes=64 << 20)
oa_bin = write_hf_bin(tuned_pad16, root / "oasst", max_shard_bytes=64 << 20)
xor = root / "oa-xor"
xor.mkdir()
for p in sorted(oa_bin.iterdir()):
    data = np.frombuffer(p.read_bytes(), np.uint8).copy()
    bp = base_bin / p.name
    if bp.exists():
        bb = np.frombuffer(bp.read_bytes(), np.uint8)[: len(data)]
        data[: len(bb)] ^= bb
    (xor / p.name).write_bytes(data.tobytes())
print("built", root)
