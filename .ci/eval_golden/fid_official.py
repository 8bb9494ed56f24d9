"""Golden numbers for test_distar.py's FID tests, from the official code: clean-fid 0.1.35's
compute_fid ("clean" mode) with GigaGAN's evaluation transform (torchvision's center_crop, PIL
Lanczos to eval_res), as SiD-LSG and DMD2 score COCO FID, and a tiny feature extractor standing in
for NVIDIA's Inception. clean-fid needs torchvision, which fails to import with PyPI's CPU torch,
so this runs in a separate venv: pip install torch==2.14.1 torchvision==0.29.1 scipy requests tqdm
pillow==13.0.0 numpy; pip install --no-deps clean-fid==0.1.35; python fid_official.py /tmp/fidgold
(2026-12-07: it printed the numbers that test_fid_equals_clean_fid_with_gigagans_transform holds)."""
import sys

import numpy as np
import torch
import torchvision.transforms.functional as TF
from cleanfid import fid
from cleanfid.utils import ResizeDataset
from PIL import Image


def fid_folders(root):  # the same as test_distar.py's: noise PNGs of odd and even sizes
    rng, files = np.random.default_rng(31), {}
    for name, low in (("real", 0), ("fake", 60)):
        for i in range(10):
            h, w = (97, 144) if i == 0 else rng.integers(90, 200, 2)  # 0: margin 47 (rounds up)
            (root / name).mkdir(parents=True, exist_ok=True)
            files.setdefault(name, []).append(root / name / f"{i:02d}.png")
            Image.fromarray(rng.integers(low, 256, (h, w, 3), dtype=np.uint8)).save(files[name][-1])
    return files


def tiny_inception():  # the same as test_distar.py's: weights from numpy's generator
    w = np.random.default_rng(32).normal(0, 0.05, (8, 3 * 13 * 13)).astype(np.float32)
    layers = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(13), torch.nn.Flatten(),
                                 torch.nn.Linear(3 * 13 * 13, 8))
    with torch.no_grad():
        layers[2].weight.copy_(torch.from_numpy(w))
        layers[2].bias.copy_(torch.linspace(-1, 1, 8))
    return layers


class Wrapper(torch.nn.Module):  # clean-fid's InceptionV3W in "clean" mode, around tiny layers
    def __init__(self):
        super().__init__()
        self.layers = tiny_inception()

    def forward(self, x):
        return self.layers((x - 128) / 128).view(x.shape[0], -1)


def gigagan(res):  # GigaGAN's evaluation.py: CenterCropLongEdge, then PIL Lanczos
    def transform(a):
        im = Image.fromarray(a)
        return np.array(TF.center_crop(im, min(im.size)).resize((res, res), Image.LANCZOS))
    return transform


if __name__ == "__main__":
    import pathlib
    files = fid_folders(pathlib.Path(sys.argv[1]))
    for res in (256, 64):
        data = ResizeDataset(files["real"][:1], mode="clean")
        data.custom_image_tranform = gigagan(res)
        x = data[0].double().numpy()  # (3, 299, 299), clean-fid's Inception input
        print(f"eval_res {res}: sum {float(x.sum())!r} sumsq {float((x ** 2).sum())!r} "
              f"x[:, 150, 7] {x[:, 150, 7].tolist()!r}")
        v = fid.compute_fid(str(files["real"][0].parent), str(files["fake"][0].parent),
                            custom_feat_extractor=Wrapper().eval(),
                            custom_image_tranform=gigagan(res), device=torch.device("cpu"),
                            num_workers=0, batch_size=4, verbose=False)
        print(f"eval_res {res}: fid {float(v)!r}")
