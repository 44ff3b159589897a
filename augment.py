"""
The release's fine-tuning augmentation, on clips: what eval_finetune.py trains on. RandAugment, a random-resized
crop and a horizontal flip on each decoded clip as the data loader reads it, then random erasing and MixUp /
CutMix on the normalised batch on the device.

It follows the released kinetics.py / ssv2.py `_aug_frame` in its order: RandAugment on the decoded frames,
normalise, random-resized crop to S x S, horizontal flip (not SSv2), random erasing; MixUp / CutMix then mix the
batch. Every step draws its parameters once per clip and applies them to all T frames (the clip is one v2 Video),
as the release does (a per-frame draw would make the clip flicker).

Why a file of its own: each piece is torchvision's transforms v2 held to the release's bounds and samplers where
v2's differ (RandAugment's op set, levels and per-op probability; the crop's and the erased box's distributions;
the mixed, smoothed targets), and tests/test_eval_finetune.py checks them against those bounds one by one. Here
they read apart from the training run that uses them; docs/finetune.md lists every setting, its released value and
source file.
"""
import torch
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from data import VideoClips, open_video

# ============ on each clip, as the data loader reads it: RandAugment, crop, flip ============

# The release's RandAugment op set ('inc1': the ops whose severity grows with the magnitude level m in [0, 10]),
# each mapped from m to the value torchvision's kernels take: name -> (value(m, height, width) or None, random sign).
RANDAUG_OPS = {
    "AutoContrast": (None, False),
    "Equalize": (None, False),
    "Invert": (None, False),
    "Rotate": (lambda m, h, w: m / 10 * 30, True),                # degrees
    "Posterize": (lambda m, h, w: 4 - int(m / 10 * 4), False),    # bits kept: 4 down to 0 as m grows
    "Solarize": (lambda m, h, w: 256 - int(m / 10 * 256), False),  # invert pixels >= this: 256 (none) down to 0
    "SolarizeAdd": (lambda m, h, w: int(m / 10 * 110), False),    # added to pixels below 128
    "Color": (lambda m, h, w: m / 10 * 0.9, True),                # blend factor 1 +- 0.9 m / 10 (saturation)
    "Contrast": (lambda m, h, w: m / 10 * 0.9, True),
    "Brightness": (lambda m, h, w: m / 10 * 0.9, True),
    "Sharpness": (lambda m, h, w: m / 10 * 0.9, True),
    "ShearX": (lambda m, h, w: m / 10 * 0.3, True),               # shear factor (tan of the angle)
    "ShearY": (lambda m, h, w: m / 10 * 0.3, True),
    "TranslateX": (lambda m, h, w: m / 10 * 0.45 * w, True),      # pixels, a fraction of the frame
    "TranslateY": (lambda m, h, w: m / 10 * 0.45 * h, True),
}


class ClipRandAugment(v2.RandAugment):
    """RandAugment as the release runs it ('rand-m7-n4-mstd0.5-inc1'), on a uint8 clip (T, 3, H, W): one draw
    for all T frames.

    Per call, num_ops ops are drawn uniformly with replacement from RANDAUG_OPS; each is applied with probability
    1/2, at a level drawn afresh from N(magnitude, magnitude_std) clipped to [0, 10], with a random sign where the
    op has one. torchvision's v2.RandAugment applies every drawn op at one fixed magnitude bin and has neither
    Invert nor SolarizeAdd in its set; its kernels (v2's op dispatch) do the work here. Geometric ops fill
    with grey (128, the release's default fill) and use bilinear interpolation (the release: bicubic on PIL
    images; torchvision's tensor kernels offer nearest and bilinear only).
    """

    _AUGMENTATION_SPACE = RANDAUG_OPS

    def __init__(self, num_ops=4, magnitude=7.0, magnitude_std=0.5):
        super().__init__(num_ops=int(num_ops), interpolation=v2.InterpolationMode.BILINEAR, fill=128)
        self.magnitude, self.magnitude_std = float(magnitude), float(magnitude_std)

    def level(self):
        """One op's magnitude level: N(magnitude, magnitude_std) clipped to [0, 10] (timm's 'mstd')."""
        return min(10.0, max(0.0, self.magnitude + self.magnitude_std * torch.randn(()).item()))

    def forward(self, *inputs):
        flat_inputs, clip = self._flatten_and_extract_image_or_video(inputs)
        height, width = TF.get_size(clip)
        names = list(self._AUGMENTATION_SPACE)
        for _ in range(self.num_ops):
            name = names[torch.randint(len(names), ()).item()]
            if torch.rand(()).item() < 0.5:
                continue  # each drawn op is applied with probability 1/2
            value_of, signed = self._AUGMENTATION_SPACE[name]
            value = 0.0 if value_of is None else value_of(self.level(), height, width)
            if signed and torch.rand(()).item() < 0.5:
                value = -value
            clip = self.apply_op(clip, name, value)
        return self._unflatten_and_insert_image_or_video(flat_inputs, clip)

    def apply_op(self, clip, name, value):
        """One op with its value on uint8 frames (..., 3, H, W)."""
        if name == "SolarizeAdd":  # not in torchvision: lift the dark pixels, saturating at 255
            lifted = (clip.as_subclass(torch.Tensor).int() + int(value)).clamp_(max=255).to(torch.uint8)
            out = torch.where(clip.as_subclass(torch.Tensor) < 128, lifted, clip.as_subclass(torch.Tensor))
            return tv_tensors.wrap(out, like=clip) if isinstance(clip, tv_tensors.TVTensor) else out
        if name == "Solarize":  # an integer threshold in pixel values (v2's op takes a fraction of 255)
            return clip if value > 255 else TF.solarize(clip, threshold=value)
        return self._apply_image_or_video_transform(clip, name, value, interpolation=self.interpolation,
                                                    fill=self._fill)


class ClipTransform:
    """uint8 frames (T, H, W, 3) of one clip -> uint8 (3, T, S, S): the release's training augmentation up to the
    flip. data.normalize follows on the device, then random erasing on the batch (erase_clips).

    The crop is v2.RandomResizedCrop with the release's bounds and sampler (area fraction uniform in crop_scale,
    log-uniform aspect ratio in crop_ratio, 10 tries, then a centre crop), bilinear without antialiasing as the
    release's interpolate call. The release normalises before cropping; cropping the uint8 frames first rounds
    the resized pixels to whole values (at most 0.5 / 255) and is several times faster.
    """

    def __init__(self, size, randaug=(4, 7.0, 0.5), crop_scale=(0.25, 1.0), crop_ratio=(0.75, 1.3333), flip=True):
        self.randaug = ClipRandAugment(*randaug) if randaug[0] > 0 else None
        self.crop = v2.RandomResizedCrop(size, scale=crop_scale, ratio=crop_ratio,
                                         interpolation=v2.InterpolationMode.BILINEAR, antialias=False)
        steps = [self.randaug, self.crop, v2.RandomHorizontalFlip() if flip else None]  # uint8 in, uint8 out
        self.steps = v2.Compose([s for s in steps if s is not None])

    def __call__(self, frames):
        clip = self.steps(tv_tensors.Video(frames.permute(0, 3, 1, 2)))  # (T, 3, S, S), one draw per step
        return clip.as_subclass(torch.Tensor).transpose(0, 1).contiguous()  # (3, T, S, S)


class AugmentedClips(VideoClips):
    """Training clips read as data.VideoClips reads them (the same frames, the same handling of unreadable
    videos; `clips` is the VideoClips that parsed the dataset), augmented by `transform` instead of data.py's
    multi-scale crop. Items: (clip (3, T, S, S), label), or ((R, 3, T, S, S), (R,)) with repeats R."""

    def __init__(self, clips, transform):
        super().__init__(clips.samples, clips.classes, num_frames=clips.num_frames, stride=clips.stride,
                         size=clips.size, train=True, repeats=clips.views, max_bad_fraction=clips.max_bad_fraction,
                         decode_threads=clips.decode_threads, sampling=clips.sampling)
        self.transform = transform

    def _load(self, path, index=0):  # index: the clip's place in the dataset (data.py's overlays; none here)
        with open_video(path, self.decode_threads) as video:
            positions = self._positions(video.num_frames)  # (V, T); clamped in read()
            frames = video.read(positions.flatten())  # (V*T, H, W, 3) uint8, one decode for all views
        frames = frames.view(self.views, self.num_frames, *frames.shape[1:])  # (V, T, H, W, 3)
        return torch.stack([self.transform(f) for f in frames])  # (V, 3, T, S, S), each view its own draw

# ============ on the batch, on the device: random erasing, MixUp / CutMix ============


class ClipErasing(v2.RandomErasing):
    """Random erasing of a normalised clip (T, 3, H, W), as the release's random_erasing.py in 'pixel' mode with
    one box per clip: with probability p, one box (area fraction uniform in [0.02, 1/3], log-uniform aspect
    h / w in [0.3, 1/0.3]) is filled with N(0, 1) values, the same box in every frame and fresh values in each.

    v2.RandomErasing draws the box once per call but repeats one (3, h, w) noise patch in every frame; here each
    frame gets its own, as released. It tries 10 boxes before giving up (the release 100); a box fits in a
    square clip in 99.5% of tries (docs/finetune.md), so giving up is a 1e-23 event.
    """

    def __init__(self, p=0.25):
        super().__init__(p=p, scale=(0.02, 1 / 3), ratio=(0.3, 1 / 0.3), value=0.0, inplace=True)

    def make_params(self, flat_inputs):
        params = super().make_params(flat_inputs)  # the box (i, j, h, w); v = None if none fitted
        if params["v"] is not None:
            clip = flat_inputs[0]
            params["v"] = torch.randn(clip.shape[0], clip.shape[1], params["h"], params["w"], device=clip.device)
        return params


def erase_clips(videos, eraser):
    """videos (B, 3, T, H, W), normalised: each clip erased on its own draw, in place. Returns videos."""
    if eraser is not None:
        for clip in videos:
            eraser(clip.transpose(0, 1))  # (T, 3, H, W) view: one box for all frames, written into videos
    return videos


def build_mixer(mixup, cutmix, num_classes):
    """MixUp and/or CutMix (v2), one of them per batch with probability 1/2 each (released switch_prob 0.5,
    mixup_prob 1); None when both alphas are 0."""
    ops = ([v2.MixUp(alpha=mixup, num_classes=num_classes)] if mixup > 0 else []) + \
          ([v2.CutMix(alpha=cutmix, num_classes=num_classes)] if cutmix > 0 else [])
    return None if not ops else ops[0] if len(ops) == 1 else v2.RandomChoice(ops)


def mix_batch(videos, labels, mixer, num_classes, smoothing):
    """videos (B, 3, T, H, W), labels (B,) -> (mixed videos, soft targets (B, C), each row summing to 1).

    v2's MixUp / CutMix pair clip b with clip b-1 (a roll of the batch; the release pairs b with B-1-b) and
    return the mixed one-hot labels lam * onehot(y_b) + (1 - lam) * onehot(y_b-1), lam corrected to the pasted
    area for CutMix; CutMix cuts the same box out of every frame. Smoothing is applied afterwards,
    t * (1 - s) + s / C: since the mixed one-hot sums to 1 this equals the release's order (smooth each
    one-hot, then mix) exactly.
    """
    if mixer is None:
        soft = F.one_hot(labels, num_classes).float()
    else:
        mixed, soft = mixer(tv_tensors.Video(videos.transpose(1, 2)), labels)  # v2 wants videos (B, T, C, H, W)
        videos = mixed.as_subclass(torch.Tensor).transpose(1, 2)  # (B, 3, T, H, W)
    return videos, soft * (1 - smoothing) + smoothing / num_classes
