"""A new user's own teacher (issue 10 "done when"): torchvision mobilenet_v2 trained on a CIFAR-10 subset with
plain x / 255 inputs (no mean/std), then compressed by hwkd with that preprocessing stated.

Usage: python benchmarks/byo_teacher.py [EPOCHS]   (subset folders are symlinks under /tmp/byo/data)
Then:  see benchmarks/results/byo_teacher.md for the hwkd compress command and the measured result.
"""

import json
import sys
import time
from pathlib import Path

import torch
import torchvision
from torchvision.transforms import v2

src = Path("/work/shared/data/cifar10/train")
root = Path("/tmp/byo/data")
if not root.exists():
    for c in sorted(p.name for p in src.iterdir()):
        files = sorted((src / c).glob("*.jpg"))[:700]
        for split, part in (("train", files[:500]), ("val", files[500:600]), ("test", files[600:700])):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for f in part:
                (d / f.name).symlink_to(f)
torch.manual_seed(0)
torch.set_num_threads(1)
tf = v2.Compose(
    [v2.PILToTensor(), v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True)]
)  # x / 255 only
ev = v2.Compose([v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True)])
tr = torchvision.datasets.ImageFolder(root / "train", tf)
te = torchvision.datasets.ImageFolder(root / "test", ev)
dl = torch.utils.data.DataLoader(tr, batch_size=64, shuffle=True, num_workers=1)
model = torchvision.models.mobilenet_v2(weights=None, num_classes=10)
epochs = int(sys.argv[1]) if len(sys.argv) > 1 else 6
opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=epochs * len(dl))
t0 = time.time()
for e in range(epochs):
    model.train()
    for x, y in dl:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    right = 0
    with torch.no_grad():
        for x, y in torch.utils.data.DataLoader(te, batch_size=256):
            right += int((model(x).argmax(1) == y).sum())
    print(
        f"epoch {e + 1} loss {loss.item():.3f} test {right / len(te):.4f} {time.time() - t0:.0f}s", flush=True
    )
torch.save(model.state_dict(), "/tmp/byo/teacher.pt")
json.dump(
    {"test_accuracy": right / len(te), "epochs": epochs, "seconds": round(time.time() - t0)},
    open("/tmp/byo/teacher.json", "w"),
)
