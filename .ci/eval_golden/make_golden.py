"""Golden outputs of the official ImageReward, HPSv2.1 and LAION-aesthetic code on tiny random
models (README.md beside this file says how to run it). Writes, beside this file: img*.png,
ir_vocab.txt, ir_med_config.json, clip_vocab.json + clip_merges.txt (the slice of open_clip's BPE
that the prompts use, with the real ids), weights.npz (each model's state dict in its official
key format, fp16: every value is exact in fp16 and was used as fp32) and golden.json."""
import gzip, json, os, sys, types, site
import numpy as np
import torch
import torch.nn as nn
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
LONG = "a very long prompt " + " ".join(f"word{i}" for i in range(120))
PROMPTS = ["a shiba inu wearing a red scarf", "The skyline of New York City at night!",
           "a volcano exploding next to a marina, wow!!", LONG]
SIZES = [(320, 320), (384, 256), (160, 240)]  # (w, h): downscaled, wide, upscaled (IR's 224 short side)
IMAGES = [0, 1, 2, 0]  # the image of each prompt


def make_images():
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(SIZES):
        y, x = np.mgrid[0:h, 0:w] / max(h, w)
        base = np.stack([np.sin(7 * x + 1), np.cos(5 * y), np.sin(3 * (x + y))], -1) * 0.4 + 0.5
        base[(x * 9).astype(int) % 2 == (y * 9).astype(int) % 2] *= 0.6  # hard edges: resizers differ
        noise = np.zeros_like(base)
        noise[: h // 2] = 0.06 * rng.standard_normal((h // 2, w, 3))  # noise on the top half
        a = np.clip(base + noise, 0, 1)
        Image.fromarray((a * 255).round().astype(np.uint8)).save(f"{HERE}/img{i}.png", optimize=True)
    return [Image.open(f"{HERE}/img{i}.png").convert("RGB") for i in range(len(SIZES))]


def perturb_fp16(model, seed, noise=0.05):
    """Random weights (init + noise) that fp16 holds exactly, so the fixture stores them in fp16."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * torch.randn_like(p))
            p.copy_(p.half().float())


def gain_one(head):
    """A head's Linear layers with weights N(0, 1 / fan_in): its output varies with its input as
    much as the input does (PyTorch's default init shrinks it ~sqrt(3) a layer, to ~1e-2 here)."""
    with torch.no_grad():
        for m in head:
            if isinstance(m, nn.Linear):
                m.weight.normal_(0, m.weight.shape[1] ** -0.5)


def fp16_sd(prefix, sd):
    out = {}
    for k, v in sd.items():
        v = v.detach().cpu()
        out[prefix + k] = v.half().numpy() if v.is_floating_point() else v.numpy()
        if v.is_floating_point():
            assert torch.equal(v.half().float(), v), k
    return out


torch.manual_seed(0)  # the models' own inits too
imgs = make_images()
pairs = [(PROMPTS[i], imgs[IMAGES[i]]) for i in range(len(PROMPTS))]
weights, golden = {}, dict(prompts=PROMPTS, images=[f"img{i}.png" for i in IMAGES])

# ---- ImageReward (image-reward 1.5): its own package, skipping __init__ (it imports clip, ReFL)
sp = [p for p in site.getsitepackages() if os.path.isdir(os.path.join(p, "ImageReward"))][0]
for name, sub in [("ImageReward", ""), ("ImageReward.models", "models")]:
    m = types.ModuleType(name); m.__path__ = [os.path.join(sp, "ImageReward", sub)]; sys.modules[name] = m
import ImageReward.models.BLIP.blip as blip
import ImageReward.models.BLIP.blip_pretrain as blip_pretrain
from ImageReward.models.BLIP.vit import VisionTransformer
from transformers import BertTokenizer
words = sorted(set(" ".join(PROMPTS[:3]).lower().replace("!", " ").replace(",", " ").split()))
open(f"{HERE}/ir_vocab.txt", "w").write("\n".join(
    ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "!", ",", "very", "long", "prompt"] + words) + "\n")
blip.BertTokenizer.from_pretrained = classmethod(lambda cls, *a, **k: BertTokenizer(f"{HERE}/ir_vocab.txt"))
# the official ViT-L/16 (create_vit('large')) shrunk: width 32, 2 blocks, 2 heads; the rest as is
IR_VIT = dict(hidden=32, layers=2, heads=2)
blip_pretrain.create_vit = lambda vit, image_size, *a: (VisionTransformer(
    img_size=image_size, patch_size=16, embed_dim=IR_VIT["hidden"], depth=IR_VIT["layers"],
    num_heads=IR_VIT["heads"]), IR_VIT["hidden"])
n_vocab = len(open(f"{HERE}/ir_vocab.txt").read().split()) + 2  # + [DEC], [ENC]
med = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
       "hidden_dropout_prob": 0.1, "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 64,
       "layer_norm_eps": 1e-12, "max_position_embeddings": 40, "model_type": "bert",
       "num_attention_heads": 2, "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2,
       "vocab_size": n_vocab, "encoder_width": 768, "add_cross_attention": True}
json.dump(med, open(f"{HERE}/ir_med_config.json", "w"), indent=1)
from ImageReward.ImageReward import ImageReward
ir = ImageReward(med_config=f"{HERE}/ir_med_config.json", device="cpu")
# the official MLP(768) is 768-1024-128-64-16-1; here the same layers (Linear at 0, 2, 4, 6, 7,
# dropouts between) at widths that fit the tiny BERT
ir.mlp.layers = nn.Sequential(nn.Linear(32, 24), nn.Dropout(0.2), nn.Linear(24, 16), nn.Dropout(0.2),
                              nn.Linear(16, 8), nn.Dropout(0.1), nn.Linear(8, 4), nn.Linear(4, 1))
gain_one(ir.mlp.layers)
perturb_fp16(ir, 0, noise=0.15)  # larger than init: the image and each weight move the reward
ir.eval()
with torch.no_grad():
    golden["image_reward"] = [ir.score(p, im) for p, im in pairs]  # the official per-image path
    tok = ir.blip.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35)
golden["image_reward_ids"] = tok["input_ids"]
golden["image_reward_vit"] = IR_VIT
weights.update(fp16_sd("image_reward/", ir.state_dict()))
print("ImageReward", golden["image_reward"])

# ---- HPSv2.1 (hpsv2x 1.2.0's open_clip fork): a tiny ViT-H-14-shaped model
from hpsv2.src.open_clip import create_model_and_transforms, get_tokenizer, factory
from hpsv2.src.open_clip import tokenizer as oc_tok
HPS_CFG = {"embed_dim": 16, "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 16,
           "patch_size": 14}, "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32,
                                            "heads": 2, "layers": 2}}
factory._MODEL_CONFIGS["tiny-H"] = HPS_CFG
kw = dict(precision="fp32", device="cpu", jit=False, force_quick_gelu=False, force_custom_text=False,
          force_patch_dropout=False, force_image_size=None, pretrained_image=False, image_mean=None,
          image_std=None, light_augmentation=True, aug_cfg={}, output_dict=True,
          with_score_predictor=False, with_region_predictor=False)  # as hpsv2's evaluation.py
hps, _, preprocess_val = create_model_and_transforms("tiny-H", None, **kw)
perturb_fp16(hps, 1)
hps.eval()
ids = get_tokenizer("ViT-H-14")(PROMPTS)  # (4, 77)
with torch.no_grad():  # token rows no prompt uses are zero: the fixture compresses them away
    keep = torch.zeros(49408, dtype=torch.bool); keep[ids.unique()] = True
    hps.token_embedding.weight[~keep] = 0
    px = torch.stack([preprocess_val(im) for _, im in pairs])
    out = hps(px, ids)
    golden["hps"] = (out["image_features"] * out["text_features"]).sum(-1).tolist()  # x100: Table 3
golden["hps_ids"] = ids.tolist()
golden["hps_config"] = HPS_CFG
weights.update(fp16_sd("hps/", hps.state_dict()))
print("HPS", golden["hps"])
# the slice of open_clip's BPE the prompts need: the merges that fire, in rank order, real ids
bpe = oc_tok._tokenizer
fired = set()
for text in PROMPTS:
    for token in __import__("regex").findall(bpe.pat, oc_tok.whitespace_clean(oc_tok.basic_clean(text)).lower()):
        word = tuple("".join(bpe.byte_encoder[b] for b in token.encode("utf-8")))
        word = word[:-1] + (word[-1] + "</w>",)
        while len(word) > 1:
            pairs_ = {(a, b) for a, b in zip(word, word[1:])}
            best = min(pairs_, key=lambda p: bpe.bpe_ranks.get(p, float("inf")))
            if best not in bpe.bpe_ranks:
                break
            fired.add(best)
            new, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    new.append(word[i] + word[i + 1]); i += 2
                else:
                    new.append(word[i]); i += 1
            word = tuple(new)
merges = sorted(fired, key=bpe.bpe_ranks.get)
base = list(oc_tok.bytes_to_unicode().values())
vocab = {t: bpe.encoder[t] for t in base + [b + "</w>" for b in base] + ["".join(m) for m in merges]}
vocab.update({"<|startoftext|>": 49406, "<|endoftext|>": 49407})
json.dump(vocab, open(f"{HERE}/clip_vocab.json", "w"))
open(f"{HERE}/clip_merges.txt", "w").write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))

# ---- Aesthetic: openai CLIP (openai-clip 1.0.1) encode_image, numpy L2 norm and the LAION MLP, as
# improved-aesthetic-predictor's simple_inference.py; tiny CLIP, tiny head of the same layers
import clip
from clip.clip import _transform
m = clip.model.CLIP(embed_dim=16, image_resolution=224, vision_layers=2, vision_width=64,
                    vision_patch_size=14, context_length=77, vocab_size=49408, transformer_width=16,
                    transformer_heads=2, transformer_layers=1).float()
# ViT-L/14 has heads = width // 64; the tiny one 2 heads of 16 (the official class, other sizes)
m.visual = clip.model.VisionTransformer(input_resolution=224, patch_size=14, width=32, layers=2,
                                        heads=2, output_dim=16)
head = nn.Sequential(nn.Linear(16, 24), nn.Dropout(0.2), nn.Linear(24, 16), nn.Dropout(0.2),
                     nn.Linear(16, 8), nn.Dropout(0.1), nn.Linear(8, 4), nn.Linear(4, 1))
gain_one(head)
perturb_fp16(m, 2, noise=0.15); perturb_fp16(head, 3)
with torch.no_grad():  # aesthetics reads no text: the text tower is zero (it compresses away)
    for n, p in m.named_parameters():
        if not n.startswith("visual."):
            p.zero_()
m.eval(); head.eval()
pre = _transform(224)
with torch.no_grad():
    f = m.encode_image(torch.stack([pre(im) for im in imgs])).numpy()
    l2 = np.atleast_1d(np.linalg.norm(f, 2, -1)); l2[l2 == 0] = 1
    golden["aesthetic"] = head(torch.from_numpy(f / l2[:, None]).float()).squeeze(-1).tolist()
golden["aesthetic_images"] = [f"img{i}.png" for i in range(len(imgs))]
weights.update(fp16_sd("aesthetic_clip/", m.state_dict()))
weights.update(fp16_sd("aesthetic_head/", {"layers." + k: v for k, v in head.state_dict().items()}))
print("aesthetic", golden["aesthetic"])
np.savez_compressed(f"{HERE}/weights.npz", **weights)
json.dump(golden, open(f"{HERE}/golden.json", "w"), indent=1)
