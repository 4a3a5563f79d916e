"""The built-in world: small 3D-looking scenes of one object, described by a caption grammar.

Every scene is one object (``kind``) of one ``colour`` and ``size`` at one ``position`` in front
of a ``background`` (a floor receding to a horizon, under a sky). Rendering is pure numpy and
deterministic: the same ``Scene`` (which carries its own nuisance ``seed`` for textures and
jitter) always gives the same pixels. Each render comes with its ground truth: a depth map
(distance from the camera, larger = farther; ``disparity`` gives the MiDaS-style inverse that
depth2img models expect) and the object's mask.

A *subject* is an object the world never shows, each stressing something else that DreamBooth must
teach: ``checker_box`` a texture (a box with a teal-and-cream checkerboard), ``crescent`` a shape (a
yellow crescent, of the class "ring"), ``twotone_ball`` a colour pairing on a known kind (a ball, red
on the left and blue on the right). ``render(scene, subject="crescent")`` draws it instead of the
generic object.

Captions: ``"a photo of a large red ball on the left, on grass"``; every attribute may be left
out (``caption(scene, stated={"kind", "background"})`` -> ``"a photo of a ball on grass"``), and
``parse`` reads the stated attributes back from any prompt that uses the grammar's words.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np
from PIL import Image

from sdtune.errors import SdtuneError

# Every word below is a single token of the CLIP BPE vocabulary (checked in tests/test_world.py),
# so each attribute maps to one embedding the text encoder can learn.
KINDS = ("ball", "box", "cone", "ring", "star")
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
BACKGROUNDS = ("grass", "sand", "snow", "night")
ATTRIBUTES = ("kind", "colour", "size", "position", "background")
CHOICES = {"kind": KINDS, "colour": COLOURS, "size": SIZES, "position": POSITIONS, "background": BACKGROUNDS}
GENERIC_NOUN = "object"  # used when a caption leaves the kind out
IDENTIFIER = "sks"

ALBEDO = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 190, 60),
    "blue": (40, 80, 230),
    "purple": (150, 50, 200),
}
POSITION_PHRASE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
BACKGROUND_PHRASE = {"grass": "on grass", "sand": "on sand", "snow": "on snow", "night": "at night"}
# Object centres in a 64-unit canvas; 15 units apart so position stays unambiguous after jitter.
ANCHORS = {"left": (17.0, 32.0), "right": (47.0, 32.0), "top": (32.0, 17.0), "bottom": (32.0, 47.0), "center": (32.0, 32.0)}
RADIUS = {"small": (6.0, 7.5), "large": (11.5, 13.0)}
JITTER = 2.0
HORIZON = 12.0  # row of the horizon in the 64-unit canvas
FOCAL = 32.0  # camera focal length in canvas units (camera height 1): floor distance = FOCAL / (row - HORIZON)
SKY_DEPTH = 50.0
CANVAS = 64.0
SUPERSAMPLE = 2  # anti-aliasing: render at 2x, average down; mask = coverage >= 1/2

# Subjects: class noun, identifier (a rare CLIP token, one per subject so several can train together),
# look and colours. The checker colours are deliberately outside COLOURS; the crescent and the two-tone
# ball use the world's own colours, so only their shape (crescent) or pairing (two-tone) is new.
# "captions": whether the shipped folder captions each render with its context (sdtune/world/subjects.py), so each
# subject is drawn where the prompt says. "training": training keys the shipped folder recommends (subject.json's
# "training"; the demo applies them, the command line wins): output preservation for the two-tone ball, whose class
# differs from it only in colour and drifted without it; attention-only LoRA targets for the crescent, a silhouette
# that the attention layers reach alone (a texture like the checker box's needs the convolutions, so the default
# stays `all`); a masked loss averaged over pixels for the ball, so a small subject's pixels do not count several
# times an unmasked class image's. The measurements behind each choice: docs/embedded-world.md and
# docs/experiments.md.
SUBJECTS = {
    "checker_box": {"class_noun": "box", "identifier": "sks", "look": "checker",
                    "colours": ((20, 160, 150), (245, 235, 210)), "checks": 3, "captions": True,
                    "stresses": "a texture: a box whose faces are a teal-and-cream checkerboard"},
    "crescent": {"class_noun": "ring", "identifier": "ohwx", "look": "crescent", "colours": (ALBEDO["yellow"],),
                 "captions": True, "training": {"lora_targets": "attention"},
                 "stresses": "a shape: a yellow crescent, a silhouette the world never shows"},
    "twotone_ball": {"class_noun": "ball", "identifier": "hta", "look": "two_tone",
                     "colours": (ALBEDO["red"], ALBEDO["blue"]), "captions": True,
                     "training": {"output_preservation_weight": 1.0, "masked_loss_mean": "pixels"},
                     "stresses": "a colour pairing on a known kind: a ball, red on its left half, blue on its right"},
}

LIGHT = np.array([-0.5, -0.6, 0.65]) / np.linalg.norm([-0.5, -0.6, 0.65])
HALF = (LIGHT + np.array([0.0, 0.0, 1.0])) / np.linalg.norm(LIGHT + np.array([0.0, 0.0, 1.0]))


@dataclass(frozen=True)
class Scene:
    """One scene: the five attributes plus ``seed`` for textures and small jitter."""

    kind: str = "ball"
    colour: str = "red"
    size: str = "large"
    position: str = "center"
    background: str = "grass"
    seed: int = 0

    def __post_init__(self):
        for name in ATTRIBUTES:
            value = getattr(self, name)
            if value not in CHOICES[name]:
                raise SdtuneError(f"unknown {name} {value!r}; choose one of {', '.join(CHOICES[name])}")

    def attrs(self) -> dict:
        """The five attributes as a dict (no seed)."""
        return {k: v for k, v in asdict(self).items() if k in ATTRIBUTES}


@dataclass
class RenderResult:
    image: Image.Image
    depth: np.ndarray  # float32 [H, W], distance from the camera, larger = farther
    mask: np.ndarray  # bool [H, W], the object's pixels
    caption: str
    scene: Scene | None = None
    subject: str | None = None

    @property
    def disparity(self) -> np.ndarray:
        """Inverse depth (larger = nearer), the convention of MiDaS/DPT depth estimators."""
        return (1.0 / self.depth).astype(np.float32)


def sample_scene(rng: np.random.Generator) -> Scene:
    """A uniformly random scene."""
    values = {name: CHOICES[name][int(rng.integers(len(CHOICES[name])))] for name in ATTRIBUTES}
    return Scene(**values, seed=int(rng.integers(2**31 - 1)))


def sample_stated(rng: np.random.Generator, keep: float = 0.7, always: tuple[str, ...] = ()) -> set[str]:
    """A random subset of attributes to state in a caption (each kept with probability ``keep``)."""
    return {name for name in ATTRIBUTES if name in always or rng.random() < keep}


def caption(scene: Scene, identifier: str | None = None, stated=None) -> str:
    """The caption of ``scene``, stating only the attributes in ``stated`` (default: all).

    With ``identifier`` (a subject) the colour is never stated - the subject has its own - and the
    class noun is always said: ``"a photo of sks box on snow"``.
    """
    stated = set(ATTRIBUTES if stated is None else stated)
    unknown = stated - set(ATTRIBUTES)
    if unknown:
        raise SdtuneError(f"unknown caption attribute(s) {sorted(unknown)}; choose from {', '.join(ATTRIBUTES)}")
    words = []
    if "size" in stated:
        words.append(scene.size)
    if identifier:
        words.append(identifier)
    elif "colour" in stated:
        words.append(scene.colour)
    words.append(scene.kind if ("kind" in stated or identifier) else GENERIC_NOUN)
    # DreamBooth's own form has no article before the identifier: "a photo of sks dog".
    text = "a photo of " + ("" if identifier and words[0] == identifier else "a ") + " ".join(words)
    if "position" in stated:
        text += " " + POSITION_PHRASE[scene.position]
    if "background" in stated:
        text += ("," if "position" in stated else "") + " " + BACKGROUND_PHRASE[scene.background]
    return text


_WORD_TO_ATTR = {word: (name, word) for name, words in CHOICES.items() for word in words}
_WORD_TO_ATTR["centre"] = ("position", "center")


def parse(text: str, identifier: str | None = None) -> dict:
    """The attributes a prompt states: {attr: value}, plus ``subject`` if it names one: the subject's name
    when its identifier is one of ``SUBJECTS``' (or True for another ``identifier`` given here).
    Without ``identifier``, any subject's identifier counts.

    Any wording works as long as it uses the grammar's words; a word stated twice with different
    values (``"red blue ball"``) is ambiguous and left out.
    """
    found: dict[str, str] = {}
    clash: set[str] = set()
    tokens = re.findall(r"[a-z]+", text.lower())
    for token in tokens:
        if token in _WORD_TO_ATTR:
            name, value = _WORD_TO_ATTR[token]
            if found.get(name, value) != value:
                clash.add(name)
            found[name] = value
    for name in clash:
        found.pop(name)
    named = [identifier] if identifier else [s["identifier"] for s in SUBJECTS.values()]
    for ident in named:
        if ident.lower() in tokens:
            found["subject"] = next((n for n, s in SUBJECTS.items() if s["identifier"] == ident.lower()), True)
            found.pop("colour", None)  # a subject has its own colours
            break
    return found


# ----------------------------------------------------------------------------------------------
# rendering


def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates of an n x n grid in 64-unit canvas space."""
    c = (np.arange(n, dtype=np.float64) + 0.5) * (CANVAS / n)
    return np.meshgrid(c, c)  # X (columns), Y (rows)


def _floor_depth(y: np.ndarray) -> np.ndarray:
    below = y - HORIZON
    with np.errstate(divide="ignore"):
        d = np.where(below > 0, FOCAL / np.maximum(below, 1e-6), SKY_DEPTH)
    return np.minimum(d, SKY_DEPTH)


def _mix(a, b, t):
    t = np.clip(t, 0, 1)[..., None]
    return np.asarray(a, np.float64) * (1 - t) + np.asarray(b, np.float64) * t


def _background(name: str, X, Y, rng: np.random.Generator) -> np.ndarray:
    """RGB float [0,255] background: a sky gradient above the horizon, a textured floor below."""
    n = X.shape[0]
    sky_t = Y / HORIZON
    floor_t = (Y - HORIZON) / (CANVAS - HORIZON)  # 0 at the horizon, 1 at the bottom edge
    depth = _floor_depth(Y)
    near = np.clip(1.0 / depth, 0, 1.5)  # texture contrast fades with distance
    noise = rng.normal(size=(n, n))
    if name == "grass":
        sky = _mix((110, 165, 230), (190, 215, 240), sky_t)
        blades = (noise + np.roll(noise, 1, 0) + np.roll(noise, 2, 0)) / math.sqrt(3)  # vertical streaks
        floor = _mix((115, 150, 75), (55, 115, 35), floor_t) + (blades * 18 * near)[..., None]
    elif name == "sand":
        sky = _mix((150, 190, 230), (225, 225, 215), sky_t)
        ripples = np.sin(depth * 9.0 + rng.uniform(0, 2 * math.pi)) * 12 * near
        floor = _mix((225, 205, 160), (215, 185, 125), floor_t) + (ripples + noise * 5 * near)[..., None]
    elif name == "snow":
        sky = _mix((165, 175, 195), (215, 220, 230), sky_t)
        sparkle = (noise > 2.6) * 25.0
        floor = _mix((225, 230, 240), (240, 243, 250), floor_t) + (noise * 4 - 6 + sparkle)[..., None]
        floor[..., 2] += 4
    elif name == "night":
        stars = (rng.random((n, n)) > 0.985) * rng.uniform(120, 220, (n, n))
        sky = _mix((8, 10, 35), (30, 35, 80), sky_t) + stars[..., None]
        floor = _mix((40, 45, 75), (22, 26, 48), floor_t) + (noise * 4 * near)[..., None]
    else:  # pragma: no cover - Scene validates
        raise SdtuneError(f"unknown background {name!r}")
    return np.where((Y < HORIZON)[..., None], sky, floor)


def _shade(albedo: np.ndarray, normal: np.ndarray, dim: float) -> np.ndarray:
    """Lambert + Blinn specular under one light from the upper left, so objects look round."""
    ndl = np.clip(normal @ LIGHT, 0, None)
    spec = np.clip(normal @ HALF, 0, None) ** 24
    return albedo * (0.32 + 0.68 * ndl)[..., None] * dim + (spec * 110 * dim)[..., None]


def _normalize(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True).clip(1e-9)


def _star_polygon(points: int = 5, inner: float = 0.45) -> np.ndarray:
    angles = -math.pi / 2 + np.arange(2 * points) * math.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], 1)


def _inside_polygon(px, py, poly) -> np.ndarray:
    """Even-odd point-in-polygon test, vectorised over pixels."""
    inside = np.zeros(px.shape, bool)
    n = len(poly)
    for i in range(n):
        x1, y1 = poly[i]
        x2, y2 = poly[(i + 1) % n]
        crosses = (y1 > py) != (y2 > py)
        xint = x1 + (py - y1) * (x2 - x1) / ((y2 - y1) or 1e-12)
        inside ^= crosses & (px < xint)
    return inside


def _shape(kind: str, u, v, checker=None):
    """Mask, unit normals and optional checker parity of a unit-radius shape at local coords (u, v).

    Returns (mask, normal[...,3], bulge[...] in [0,1], face_uv or None).
    """
    normal = np.zeros(u.shape + (3,))
    normal[..., 2] = 1.0
    bulge = np.zeros(u.shape)
    parity = None
    if kind == "ball":
        r2 = u * u + v * v
        mask = r2 <= 1.0
        nz = np.sqrt(np.clip(1 - r2, 0, 1))
        normal = np.stack([u, v, nz], -1)
        bulge = nz
    elif kind == "ring":
        rho = np.sqrt(u * u + v * v)
        mask = (rho >= 0.45) & (rho <= 1.0)
        d = np.clip((rho - 0.725) / 0.275, -1, 1)
        nz = np.sqrt(np.clip(1 - d * d, 0, 1))
        rs = np.maximum(rho, 1e-6)
        normal = np.stack([u / rs * d, v / rs * d, nz], -1)
        bulge = nz * 0.5
    elif kind == "box":
        # Oblique view of a cube: front square, top and right faces receding up-right.
        s, k = 0.7, 0.3
        fx, fy = u + 0.15, v - 0.15
        front = (np.abs(fx) <= s) & (np.abs(fy) <= s)
        t_top = (-(s - 0.15) - v) / k  # 0 at the front-top edge, 1 at the back-top edge
        top = (t_top >= 0) & (t_top <= 1) & (u >= -0.85 + k * t_top) & (u <= 0.55 + k * t_top) & ~front
        t_side = (u - 0.55) / k
        side = (t_side >= 0) & (t_side <= 1) & (v >= -0.55 - k * t_side) & (v <= 0.85 - k * t_side) & ~front & ~top
        mask = front | top | side
        normal = np.where(front[..., None], np.array([0.0, 0.0, 1.0]), normal)
        normal = np.where(top[..., None], _normalize(np.array([0.0, -0.85, 0.5])), normal)
        normal = np.where(side[..., None], _normalize(np.array([0.9, 0.0, 0.45])), normal)
        bulge = np.where(front, 1.0, 0.6)
        if checker:
            # Face coordinates in [0,1]^2, so each face shows checker x checker squares.
            a = np.where(front, (fx + s) / (2 * s), np.where(top, (u + 0.85 - k * t_top) / 1.4, t_side))
            b = np.where(front, (fy + s) / (2 * s), np.where(top, t_top, (v + 0.55 + k * t_side) / 1.4))
            ia = np.clip(np.floor(a * checker), 0, checker - 1)
            ib = np.clip(np.floor(b * checker), 0, checker - 1)
            parity = ((ia + ib) % 2).astype(bool)
    elif kind == "cone":
        apex, base, ex, ey = -1.2, 0.6, 0.8, 0.2
        half = ex * (v - apex) / (base - apex)
        tri = (v >= apex) & (v <= base) & (np.abs(u) <= half)
        ell = (u / ex) ** 2 + ((v - base) / ey) ** 2 <= 1.0
        mask = tri | ell
        w = np.clip(u / np.maximum(np.where(tri, half, ex), 1e-6), -1, 1)
        normal = _normalize(np.stack([w * 0.85, np.full(u.shape, -0.35), np.sqrt(1 - w * w) * 0.85 + 0.05], -1))
        bulge = np.sqrt(1 - w * w)
    elif kind == "crescent":  # a subject's silhouette, not a world kind: a disc with a disc bitten out
        r2 = u * u + v * v
        bite = (u - 0.45) ** 2 + (v + 0.3) ** 2 <= 0.72 ** 2
        mask = (r2 <= 1.0) & ~bite
        nz = np.sqrt(np.clip(1 - r2, 0, 1))
        normal = np.stack([u, v, nz], -1)
        bulge = nz
    elif kind == "star":
        poly = _star_polygon()
        mask = _inside_polygon(u, v, poly)
        # A shallow faceted pyramid: each of the 10 triangles (centre, vertex i, vertex i+1) has its own normal.
        ang = (np.arctan2(v, u) + math.pi / 2) % (2 * math.pi)
        sector = np.floor(ang / (math.pi / 5)).astype(int) % 10
        apex = np.array([0.0, 0.0, 0.55])
        facet = []
        for i in range(10):
            p1 = np.append(poly[i], 0.0)
            p2 = np.append(poly[(i + 1) % 10], 0.0)
            n = np.cross(p2 - apex, p1 - apex)
            n = n if n[2] > 0 else -n
            facet.append(n / np.linalg.norm(n))
        normal = np.asarray(facet)[sector]
        bulge = np.clip(1 - np.sqrt(u * u + v * v), 0, 1)
    else:  # pragma: no cover - Scene validates
        raise SdtuneError(f"unknown kind {kind!r}")
    return mask, normal, bulge, parity


def _block_mean(a: np.ndarray, f: int) -> np.ndarray:
    if f == 1:
        return a
    h, w = a.shape[:2]
    return a.reshape(h // f, f, w // f, f, *a.shape[2:]).mean(axis=(1, 3))


def render(scene: Scene, size: int = 64, subject: str | None = None, identifier: str | None = None) -> RenderResult:
    """Render ``scene`` at ``size`` x ``size`` pixels (its ground truth too); ``subject`` draws that subject
    (its caption names it by ``identifier``, by default the subject's own)."""
    if subject is not None and subject not in SUBJECTS:
        raise SdtuneError(f"unknown subject {subject!r}; choose one of {', '.join(SUBJECTS)}")
    if size < 8:
        raise SdtuneError(f"render size must be at least 8 pixels, got {size}")
    if subject is not None and scene.kind != SUBJECTS[subject]["class_noun"]:
        scene = Scene(**{**scene.attrs(), "kind": SUBJECTS[subject]["class_noun"]}, seed=scene.seed)
    rng = np.random.default_rng(scene.seed)
    n = size * SUPERSAMPLE
    X, Y = _grid(n)

    cx, cy = ANCHORS[scene.position]
    cx += rng.uniform(-JITTER, JITTER)
    cy += rng.uniform(-JITTER, JITTER)
    radius = rng.uniform(*RADIUS[scene.size])
    dim = 0.8 if scene.background == "night" else 1.0

    bg = _background(scene.background, X, Y, rng)
    u, v = (X - cx) / radius, (Y - cy) / radius
    spec = SUBJECTS.get(subject) if subject else None
    look = spec["look"] if spec else None
    mask_hi, normal, bulge, parity = _shape("crescent" if look == "crescent" else scene.kind, u, v,
                                            checker=spec["checks"] if look == "checker" else None)

    # Contact point on the floor = the lowest row of the object; everything of the object is at
    # that distance or nearer, so the object is always in front of the floor behind it.
    rows = np.nonzero(mask_hi.any(axis=1))[0]
    base_y = Y[rows.max(), 0] if len(rows) else cy + radius
    base_depth = float(_floor_depth(np.array(base_y)))

    # Soft drop shadow on the floor, offset away from the light.
    sd = ((X - cx - 0.3 * radius) / (1.05 * radius)) ** 2 + ((Y - base_y) / (0.28 * radius)) ** 2
    shadow = np.clip(1.2 - sd, 0, 1) * 0.45 * (Y > HORIZON)
    bg = bg * (1 - shadow[..., None])

    if look == "checker":
        c0, c1 = (np.asarray(c, np.float64) for c in spec["colours"])
        albedo = np.where(parity[..., None], c1, c0)
    elif look == "two_tone":  # split at the ball's own vertical axis
        c0, c1 = (np.asarray(c, np.float64) for c in spec["colours"])
        albedo = np.where((u < 0)[..., None], c0, c1)
    elif look == "crescent":
        albedo = np.broadcast_to(np.asarray(spec["colours"][0], np.float64), normal.shape)
    else:
        albedo = np.broadcast_to(np.asarray(ALBEDO[scene.colour], np.float64), normal.shape)
    obj = _shade(albedo, normal, dim)

    img_hi = np.where(mask_hi[..., None], obj, bg)
    img = np.clip(_block_mean(img_hi, SUPERSAMPLE), 0, 255).round().astype(np.uint8)

    coverage = _block_mean(mask_hi.astype(np.float64), SUPERSAMPLE)
    mask = coverage >= 0.5
    obj_depth = base_depth * (1.0 - 0.03 - 0.12 * bulge)
    obj_sum = _block_mean(np.where(mask_hi, obj_depth, 0.0), SUPERSAMPLE)
    floor_lo = _floor_depth(_grid(size)[1])
    depth = np.where(mask, obj_sum / np.maximum(coverage, 1e-9), floor_lo).astype(np.float32)

    text = caption(scene, identifier=(identifier or spec["identifier"]) if subject else None)
    return RenderResult(Image.fromarray(img, "RGB"), depth, mask, text, scene, subject)


def dataset(n: int, seed: int, size: int = 64, subject_share: float = 0.0,
            subjects: tuple[str, ...] | None = None) -> Iterator[RenderResult]:
    """``n`` renders of random scenes, reproducible from ``seed``; ``subject_share`` of them show one of
    ``subjects`` (default: every subject), drawn uniformly."""
    subjects = tuple(SUBJECTS) if subjects is None else tuple(subjects)
    rng = np.random.default_rng(seed)
    for _ in range(n):
        scene = sample_scene(rng)
        is_subject = subject_share > 0 and rng.random() < subject_share
        subject = subjects[int(rng.integers(len(subjects)))] if is_subject and len(subjects) > 1 else subjects[0]
        yield render(scene, size=size, subject=subject if is_subject else None)


def mask_centroid(mask: np.ndarray) -> tuple[float, float]:
    """(x, y) centroid of a mask in 64-unit canvas coordinates."""
    ys, xs = np.nonzero(mask)
    scale = CANVAS / mask.shape[0]
    return float((xs.mean() + 0.5) * scale), float((ys.mean() + 0.5) * scale)


def nearest_position(x: float, y: float) -> str:
    """The position word whose anchor is nearest to (x, y) in canvas units."""
    return min(ANCHORS, key=lambda p: (ANCHORS[p][0] - x) ** 2 + (ANCHORS[p][1] - y) ** 2)
