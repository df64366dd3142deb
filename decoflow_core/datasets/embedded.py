"""Embedded benchmark: a small MVTec-AD-style data set that builds offline in seconds.

Fifteen categories, textures and objects, are made from the photographs that ship inside
scikit-image and from objects drawn with numpy. Every image gets its own pose and lighting;
defective test images get one defect each, with a pixel mask. data/README.md is the catalogue.

Each category is three things: ``sample(rng) -> params`` draws one normal instance,
``draw(params) -> (image, foreground)`` renders it as float RGB in [0, 1], and a table of defects.
A *structural* defect redraws the instance with changed params (a part missing or moved) and its
mask is where pixels changed; a *surface* defect paints onto the image (scratch, crack, hole,
stain, foreign patch) and its mask is the painted shape.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from PIL import Image
from scipy import ndimage
from scipy.spatial import cKDTree
from skimage import data as skimage_data
from skimage import filters, measure
from tqdm.auto import tqdm

SIZE = 128                       # images are SIZE x SIZE; 128 keeps the full build under 60 MB
N_TRAIN, N_TEST_GOOD, N_PER_DEFECT = 150, 30, 15
FORMAT_VERSION = 2               # bump whenever a change alters the bytes written
MARKER = ".complete"
MIN_DEFECT_PIXELS = 4            # a defect smaller than this is redrawn elsewhere

_Y, _X = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
_ALL = np.ones((SIZE, SIZE), bool)


# --------------------------------------------------------------------------- drawing helpers
def _cover(sd):
    """Anti-aliased coverage of a shape given its signed distance in pixels (negative inside)."""
    return np.clip(0.5 - sd, 0.0, 1.0)


def _frame(cx, cy, angle):
    """Pixel coordinates in a frame centred at (cx, cy) and rotated by `angle` (radians)."""
    c, s = np.cos(angle), np.sin(angle)
    dx, dy = _X - cx, _Y - cy
    return dx * c + dy * s, -dx * s + dy * c


def _box(u, v, half_u, half_v):
    return np.maximum(np.abs(u) - half_u, np.abs(v) - half_v)


def _mix(img, colour, alpha):
    a = alpha[..., None]
    return img * (1 - a) + np.asarray(colour, np.float32) * a


def _tint(gray, dark, light):
    """Map a grey image to colours between `dark` and `light`: (H, W) -> (H, W, 3)."""
    dark, light = np.asarray(dark, np.float32), np.asarray(light, np.float32)
    return dark + gray[..., None] * (light - dark)


def _smooth_noise(rng, sigma):
    noise = ndimage.gaussian_filter(rng.standard_normal((SIZE, SIZE)).astype(np.float32), sigma, mode="wrap")
    return noise / (noise.std() + 1e-8)


def _blob(rng, cx, cy, radius, wobble=0.3):
    """Approximate signed distance to an irregular blob: a circle with random low harmonics."""
    theta, rho = np.arctan2(_Y - cy, _X - cx), np.hypot(_X - cx, _Y - cy)
    r = np.ones_like(theta)
    for k in (2, 3, 5):
        r += wobble * rng.uniform() / k * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return rho - radius * r


def _polyline_distance(points):
    """Distance of every pixel to a polyline given as (N, 2) points (x, y)."""
    dist = np.full((SIZE, SIZE), np.inf, np.float32)
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        ex, ey = x1 - x0, y1 - y0
        t = np.clip(((_X - x0) * ex + (_Y - y0) * ey) / max(ex * ex + ey * ey, 1e-6), 0, 1)
        dist = np.minimum(dist, np.hypot(_X - x0 - t * ex, _Y - y0 - t * ey))
    return dist


@lru_cache(maxsize=None)
def _photo(name, blur=0.0):
    """A scikit-image sample photo as float32 in [0, 1]; `blur` (px) avoids aliasing when zooming out."""
    img = getattr(skimage_data, name)().astype(np.float32) / 255
    if blur:
        img = ndimage.gaussian_filter(img, (blur, blur, 0)[: img.ndim])
    return img


def _view(photo, cx, cy, scale, angle, flip=False):
    """A SIZE x SIZE view of `photo` centred at (cx, cy), `scale` source pixels per output pixel."""
    u = (_X - SIZE / 2 + 0.5) * scale * (-1 if flip else 1)
    v = (_Y - SIZE / 2 + 0.5) * scale
    c, s = np.cos(angle), np.sin(angle)
    coords = [cy + u * s + v * c, cx + u * c - v * s]
    channels = [photo] if photo.ndim == 2 else [photo[..., k] for k in range(photo.shape[2])]
    out = np.stack([ndimage.map_coordinates(ch, coords, order=1, mode="reflect") for ch in channels], -1)
    return np.repeat(out, 3, -1) if out.shape[-1] == 1 else out[..., :3]


def _disc(cx, cy, radius):
    return np.hypot(_X - cx, _Y - cy) < radius


# --------------------------------------------------------------------------- textures
def _photo_texture(source, scale, max_angle, dark, light, gamma=1.0, flip=True):
    """A texture category cropped from a grey photo: random centre, rotation, zoom and mirror."""
    blur = 0.45 * scale if scale > 1 else 0.0
    turn = np.sqrt(2) if max_angle >= np.pi / 4 else np.cos(max_angle) + np.sin(max_angle)

    def sample(rng):
        h, w = _photo(source, blur).shape[:2]
        zoom = scale * rng.uniform(0.92, 1.08)
        margin = SIZE / 2 * zoom * turn + 1
        return dict(cx=rng.uniform(margin, w - margin), cy=rng.uniform(margin, h - margin), zoom=zoom,
                    angle=rng.uniform(-max_angle, max_angle), flip=flip and bool(rng.integers(2)))

    def draw(p):
        gray = _view(_photo(source, blur), p["cx"], p["cy"], p["zoom"], p["angle"], p["flip"])[..., 0]
        return _tint(gray**gamma, dark, light), _ALL

    return sample, draw


def _wood_sample(rng):
    return dict(seed=int(rng.integers(2**31)), freq=rng.uniform(0.08, 0.1), phase=rng.uniform(),
                angle=rng.uniform(-0.06, 0.06))


def _wood_draw(p):
    rng = np.random.default_rng(p["seed"])      # the grain is part of the instance, so redraws agree
    u, _ = _frame(SIZE / 2, SIZE / 2, p["angle"])
    warp = 7 * _smooth_noise(rng, 14) + 1.2 * _smooth_noise(rng, 3)
    fibre = ndimage.gaussian_filter(rng.standard_normal((SIZE, SIZE)).astype(np.float32), (7, 0.7), mode="wrap")
    rings = 0.5 + 0.5 * np.sin(2 * np.pi * (p["freq"] * (u + warp) + p["phase"]))
    gray = np.clip(0.25 + 0.6 * rings**2 + 1.6 * fibre, 0, 1)
    return _tint(gray, (0.42, 0.24, 0.11), (0.86, 0.66, 0.43)), _ALL


def _carpet_sample(rng):
    return dict(seed=int(rng.integers(2**31)), dx=rng.uniform(0, 16), dy=rng.uniform(0, 16),
                angle=rng.uniform(-0.05, 0.05), tile=rng.uniform(7.6, 8.4))


def _carpet_draw(p):
    """Basket weave: tiles alternate between horizontal and vertical runs of three threads."""
    rng = np.random.default_rng(p["seed"])
    u, v = _frame(p["dx"], p["dy"], p["angle"])
    tile = p["tile"]
    across = (np.floor(u / tile) + np.floor(v / tile)) % 2 == 0
    bumps = np.abs(np.sin(np.pi * np.where(across, v, u) * 3 / tile)) ** 0.6
    gray = np.clip(0.3 + 0.55 * bumps + 0.07 * _smooth_noise(rng, 0.7), 0, 1)
    return _tint(gray, (0.08, 0.1, 0.22), (0.35, 0.45, 0.78)), _ALL


# --------------------------------------------------------------------------- objects
def _photo_object(source, centre, jitter, scale, max_angle, radius):
    """An object category cut from a colour photo: the object stays near the centre of the frame."""
    blur = 0.45 * scale if scale > 1 else 0.0

    def sample(rng):
        dx, dy = rng.uniform(-jitter, jitter, 2)
        return dict(cx=centre[0] + dx, cy=centre[1] + dy, zoom=scale * rng.uniform(0.96, 1.04),
                    angle=rng.uniform(-max_angle, max_angle), gain=rng.uniform(0.94, 1.06, 3))

    def draw(p):
        img = _view(_photo(source, blur), p["cx"], p["cy"], p["zoom"], p["angle"]) * p["gain"]
        shift = (np.array(centre) - [p["cx"], p["cy"]]) / p["zoom"]
        return img, _disc(SIZE / 2 + shift[0], SIZE / 2 + shift[1], radius)

    return sample, draw


_COIN_FRAME = 2.5                # the view spans this many coin radii


@lru_cache(maxsize=None)
def _coins():
    """(x, y, radius) of each coin in skimage's coins photo, found by thresholding."""
    img = _photo("coins")
    mask = ndimage.binary_fill_holes(ndimage.binary_opening(img > filters.threshold_otsu(img), iterations=2))
    regions = measure.regionprops(measure.label(mask))
    coins = [(r.centroid[1], r.centroid[0], r.equivalent_diameter_area / 2) for r in regions]
    reach = _COIN_FRAME / np.sqrt(2) + 0.1      # half-diagonal of the view, in coin radii
    return tuple((x, y, r) for x, y, r in coins if 15 < r < 35 and
                 reach * r < min(x, y, img.shape[1] - x, img.shape[0] - y))


def _coin_sample(rng):
    x, y, r = _coins()[rng.integers(len(_coins()))]
    return dict(cx=x + rng.uniform(-2, 2), cy=y + rng.uniform(-2, 2), r=r, angle=rng.uniform(-0.35, 0.35))


def _coin_draw(p):
    zoom = p["r"] * _COIN_FRAME / SIZE
    img = _view(_photo("coins"), p["cx"], p["cy"], zoom, p["angle"])
    return img, _disc(SIZE / 2, SIZE / 2, 0.9 * p["r"] / zoom)


def _screw_sample(rng):
    return dict(cx=rng.uniform(58, 70), cy=rng.uniform(58, 70), angle=rng.uniform(0, 2 * np.pi),
                length=rng.uniform(53, 57), radius=rng.uniform(5.4, 5.8), head=rng.uniform(13.2, 14.2),
                pitch=rng.uniform(3.8, 4.1), phase=rng.uniform(0, 2 * np.pi), slot=rng.uniform(0, np.pi),
                bg=rng.uniform(0.7, 0.78), tip_cut=0.0, worn=None)


def _screw_draw(p):
    u, v = _frame(p["cx"], p["cy"], p["angle"])
    half_len, r, head_r = p["length"] / 2, p["radius"], p["head"]
    head_u = -half_len - 0.5 * head_r
    width = np.where(u < half_len, r, r * np.clip((half_len + 12 - u) / 12, 0, 1))      # 12 px tip
    shaft_sd = np.maximum.reduce([np.abs(v) - width, u - (half_len + 12 - p["tip_cut"]), head_u - u])
    thread = 0.5 + 0.5 * np.sin(2 * np.pi * (u + 0.4 * v) / p["pitch"] + p["phase"])
    if p["worn"] is not None:
        thread = np.where((u > p["worn"][0]) & (u < p["worn"][1]), 0.85, thread)
    shaft = 0.18 + 0.5 * np.sqrt(np.clip(1 - (v / r) ** 2, 0, 1)) * (0.45 + 0.55 * thread)
    rho = np.hypot(u - head_u, v)
    c, s = np.cos(p["angle"]), np.sin(p["angle"])
    su, sv = _frame(p["cx"] + head_u * c, p["cy"] + head_u * s, p["angle"] + p["slot"])
    slot = _cover(_box(su, sv, 0.75 * head_r, 1.3))
    head = (0.3 + 0.45 * np.sqrt(np.clip(1 - (rho / head_r) ** 2, 0, 1))) * (1 - 0.7 * slot)
    c_shaft, c_head = _cover(shaft_sd), _cover(rho - head_r)
    body = np.maximum(c_shaft, c_head)
    gray = p["bg"] * (1 - 0.3 * ndimage.gaussian_filter(np.roll(body, (2, 2), (0, 1)), 2.5))
    gray = gray * (1 - c_shaft) + shaft * c_shaft
    gray = gray * (1 - c_head) + head * c_head
    return np.repeat(gray[..., None], 3, -1), body > 0.5


def _screw_missing_tip(p, rng):
    return {**p, "tip_cut": rng.uniform(8, 22)}


def _screw_worn_thread(p, rng):
    start = rng.uniform(-p["length"] / 2, p["length"] / 2 - 3)
    return {**p, "worn": (start, start + rng.uniform(5, 14))}


def _nut_sample(rng):
    return dict(cx=rng.uniform(58, 70), cy=rng.uniform(58, 70), angle=rng.uniform(0, np.pi / 3),
                apothem=rng.uniform(33, 35), colour=np.array((0.8, 0.64, 0.32)) * rng.uniform(0.95, 1.05),
                chip=None)


def _nut_draw(p):
    x, y, a = _X - p["cx"], _Y - p["cy"], p["apothem"]
    rho = np.hypot(x, y)
    hexagon = np.max([np.abs(x * np.cos(t) + y * np.sin(t)) for t in p["angle"] + np.arange(3) * np.pi / 3], 0) - a
    sd = np.maximum.reduce([hexagon, rho - 1.08 * a, 0.5 * a - rho])     # chamfered corners, bore
    if p["chip"] is not None:
        cx, cy, r = p["chip"]
        sd = np.maximum(sd, r - np.hypot(_X - cx, _Y - cy))
    shade = 0.78 + 0.12 * (x - y) / a + 0.15 * (rho > 0.97 * a)
    thread = (rho < 0.62 * a) * (0.45 + 0.15 * np.sin(2 * np.pi * rho / 2.2) - 0.35)
    nut = np.clip(shade + thread, 0, 1.2)[..., None] * p["colour"]
    bg = np.full((SIZE, SIZE, 3), 0.13, np.float32) + 0.03 * (_Y / SIZE)[..., None]
    cover = _cover(sd)
    return _mix(bg, nut, cover), cover > 0.5


def _nut_chip(p, rng):
    corner = p["angle"] + np.pi / 6 + rng.integers(6) * np.pi / 3 + rng.uniform(-0.25, 0.25)
    dist = p["apothem"] * rng.uniform(0.95, 1.12)
    return {**p, "chip": (p["cx"] + dist * np.cos(corner), p["cy"] + dist * np.sin(corner), rng.uniform(4, 11))}


def _pill_sample(rng):
    n = int(rng.integers(20, 40))
    return dict(cx=rng.uniform(61, 67), cy=rng.uniform(61, 67), angle=rng.uniform(-0.12, 0.12),
                half_len=rng.uniform(45, 47), half_wid=rng.uniform(24, 26),
                colour=np.array((0.93, 0.9, 0.84)) * rng.uniform(0.96, 1.02),
                speckles=np.stack([rng.uniform(-40, 40, n), rng.uniform(-19, 19, n), rng.uniform(0.6, 1.4, n)], 1),
                chip=None)


def _pill_draw(p):
    u, v = _frame(p["cx"], p["cy"], p["angle"])
    hl, hw = p["half_len"], p["half_wid"]
    sd = np.hypot(np.maximum(np.abs(u) - (hl - hw), 0), v) - hw                     # stadium outline
    if p["chip"] is not None:
        cu, cv, r = p["chip"]
        sd = np.maximum(sd, r - np.hypot(u - cu, v - cv))
    dist, nearest = cKDTree(p["speckles"][:, :2]).query(np.stack([u.ravel(), v.ravel()], 1))
    speckle = _cover(dist.reshape(SIZE, SIZE) - p["speckles"][nearest.reshape(SIZE, SIZE), 2])
    groove = _cover(np.abs(u) - 0.8) * (np.abs(v) < hw - 4)
    shade = 0.8 + 0.2 * np.sqrt(np.clip(-sd / hw, 0, 1)) - 0.12 * groove
    pill = _mix(shade[..., None] * p["colour"], (0.72, 0.28, 0.22), 0.55 * speckle)
    bg = np.full((SIZE, SIZE, 3), (0.16, 0.17, 0.21), np.float32)
    cover = _cover(sd)
    return _mix(bg, pill, cover), cover > 0.5


def _pill_chip(p, rng):
    """Bite a disc out of a random point of the pill's outline."""
    hl, hw = p["half_len"], p["half_wid"]
    u = rng.uniform(-hl + 2, hl - 2)
    v = np.sqrt(max(hw**2 - max(abs(u) - (hl - hw), 0) ** 2, 0)) * rng.choice((-1, 1))
    return {**p, "chip": (u, v, rng.uniform(3.5, 9))}


def _mesh_sample(rng):
    return dict(seed=int(rng.integers(2**31)), angle=np.pi / 4 + rng.uniform(-0.03, 0.03),
                period=rng.uniform(10.6, 11.4), phases=rng.uniform(0, 11, 2), cut=None, bend=None)


def _mesh_draw(p):
    """Woven wire grid: two families of wires at right angles, alternating over and under."""
    x, y = _X, _Y
    if p["bend"] is not None:
        bx, by, sigma, amp = p["bend"]
        push = amp * np.exp(-((x - bx) ** 2 + (y - by) ** 2) / (2 * sigma**2))
        x, y = x + push * np.cos(p["angle"]), y + push * np.sin(p["angle"])
    wires = []
    for angle, phase in zip((p["angle"], p["angle"] + np.pi / 2), p["phases"]):
        s = x * np.cos(angle) + y * np.sin(angle) + phase
        index = np.floor(s / p["period"])
        off = np.abs(s - (index + 0.5) * p["period"])
        wires.append((index, _cover(off - 1.7), 0.35 + 0.5 * np.sqrt(np.clip(1 - (off / 1.7) ** 2, 0, 1))))
    (ia, ca, sa), (ib, cb, sb) = wires
    if p["cut"] is not None:
        ca = ca * (1 - _cover(np.hypot(_X - p["cut"][0], _Y - p["cut"][1]) - p["cut"][2]))
    a_on_top = (ia + ib) % 2 == 0
    gray = 0.2 + 0.03 * _smooth_noise(np.random.default_rng(p["seed"]), 4)
    for cover, shade in ((np.where(a_on_top, cb, ca), np.where(a_on_top, sb, sa)),
                         (np.where(a_on_top, ca, cb), np.where(a_on_top, sa, sb))):
        gray = gray * (1 - cover) + shade * cover
    return np.repeat(gray[..., None], 3, -1), _ALL


def _mesh_cut(p, rng):
    px, py = rng.uniform(16, SIZE - 16, 2)
    normal = np.array((np.cos(p["angle"]), np.sin(p["angle"])))
    s = px * normal[0] + py * normal[1] + p["phases"][0]
    step = (np.floor(s / p["period"]) + 0.5) * p["period"] - s                      # onto a wire's centre line
    return {**p, "cut": (px + step * normal[0], py + step * normal[1], rng.uniform(1.5, 4))}


def _mesh_bend(p, rng):
    centre, sigma = rng.uniform(20, SIZE - 20, 2), rng.uniform(3, 7)
    return {**p, "bend": (*centre, sigma, rng.uniform(1.2, 3.5) * rng.choice((-1, 1)))}


# Hand-placed circuit board: (kind, x, y, half-width, half-height) in pixels, traces as polylines.
_PCB_PARTS = (("chip", 42, 44, 16, 10), ("chip", 90, 90, 11, 11), ("resistor", 92, 30, 6, 2.5),
              ("resistor", 92, 46, 6, 2.5), ("resistor", 28, 92, 2.5, 6), ("resistor", 44, 100, 2.5, 6),
              ("capacitor", 66, 64, 4, 3), ("capacitor", 16, 60, 3, 4))
_PCB_TRACES = (((58, 38), (80, 38), (80, 30), (86, 30)), ((58, 50), (72, 50), (72, 46), (86, 46)),
               ((36, 56), (36, 72), (28, 72), (28, 86)), ((48, 56), (48, 94), (44, 94)),
               ((62, 64), (50, 64), (50, 56)), ((70, 64), (84, 64), (84, 79)),
               ((98, 30), (116, 30), (116, 90), (101, 90)), ((16, 56), (16, 40), (26, 40)),
               ((16, 64), (16, 110), (28, 110), (28, 98)), ((98, 46), (106, 46), (106, 79)))


def _swap(parts, index, kind):
    return parts[:index] + ((kind, *parts[index][1:]),) + parts[index + 1:]


# Four designs of one board, as a product line has them (the `boards` stream, for routing): the
# circuit_board's own design and three that differ from it by one or two parts and a trace.
_PCB_DESIGNS = {
    "board_a": (_PCB_PARTS, _PCB_TRACES),
    "board_b": (_PCB_PARTS + (("resistor", 66, 112, 6, 2.5),),               # one more resistor, wired
                _PCB_TRACES + (((72, 112), (84, 112), (84, 101)),)),
    "board_c": (_swap(_swap(_PCB_PARTS, 6, "resistor"), 4, "capacitor"),      # two parts of the other kind
                _PCB_TRACES),
    "board_d": (_PCB_PARTS[:1] + (("chip", 90, 90, 8, 14),) + _PCB_PARTS[2:],  # the second chip taller
                _PCB_TRACES[:8] + (((16, 64), (16, 120), (28, 120), (28, 98)),) + _PCB_TRACES[9:]),
}


@lru_cache(maxsize=64)
def _pcb_board(missing=None, moved=None, cut=None, design="board_a"):
    """Render a board design in its own coordinates; defects name a part index or a cut (x, y, r)."""
    parts, traces = _PCB_DESIGNS[design]
    rng = np.random.default_rng(7)                  # the board's look is fixed: it is the product design
    board = _tint(np.clip(0.5 + 0.12 * _smooth_noise(rng, 1.5), 0, 1), (0.04, 0.25, 0.12), (0.14, 0.46, 0.24))
    trace = _cover(np.min([_polyline_distance(np.array(t, np.float32)) for t in traces], 0) - 0.9)
    if cut is not None:
        trace = trace * (1 - _cover(np.hypot(_X - cut[0], _Y - cut[1]) - cut[2]))
    board = _mix(board, (0.3, 0.62, 0.3), trace)
    for i, (kind, x, y, hw, hh) in enumerate(parts):
        u, v = _X - x, _Y - y
        board = _mix(board, (0.9, 0.92, 0.88), _cover(np.abs(_box(u, v, hw + 3, hh + 3)) - 0.5))   # silkscreen
        long_u = hw > hh
        along, across, h_along, h_across = (u, v, hw, hh) if long_u else (v, u, hh, hw)
        if kind == "chip":
            pins = _cover(_box(along, np.abs(across) - h_across - 1.5, h_along - 2, 1.5))
            pins *= _cover(np.abs((along + h_along) % 4 - 2) - 0.9)
        else:
            pins = _cover(_box(np.abs(along) - h_along + 1.2, across, 1.8, h_across + 0.6))
        board = _mix(board, (0.78, 0.78, 0.74), pins)
        if i == missing:
            continue
        if moved is not None and moved[0] == i:
            u, v = u - moved[1], v - moved[2]
            hw, hh = (hh, hw) if moved[3] else (hw, hh)
        body = {"chip": (0.09, 0.09, 0.1), "resistor": (0.15, 0.15, 0.16), "capacitor": (0.82, 0.64, 0.3)}[kind]
        board = _mix(board, body, _cover(_box(u, v, hw - (kind != "chip") * 1.5, hh)))
        if kind == "chip":
            board = _mix(board, (0.4, 0.4, 0.42), _cover(np.hypot(u + hw - 3.5, v + hh - 3.5) - 1.3))
    return board


def _pcb_category(design):
    """sample, draw and the three structural defects of one board design."""
    parts, traces = _PCB_DESIGNS[design]

    def sample(rng):
        return dict(dx=rng.uniform(-3, 3), dy=rng.uniform(-3, 3), angle=rng.uniform(-0.03, 0.03),
                    light=rng.uniform(0, 2 * np.pi), missing=None, moved=None, cut=None)

    def draw(p):
        board = _pcb_board(p["missing"], p["moved"], p["cut"], design)
        img = _view(board, SIZE / 2 + p["dx"], SIZE / 2 + p["dy"], 1.0, p["angle"])
        light = 1 + 0.06 * ((_X - SIZE / 2) * np.cos(p["light"]) + (_Y - SIZE / 2) * np.sin(p["light"])) / SIZE
        return img * light[..., None], _ALL

    def missing(p, rng):
        return {**p, "missing": int(rng.integers(len(parts)))}

    def moved(p, rng):
        part = int(rng.integers(len(parts)))
        turn = parts[part][0] != "chip" and rng.random() < 0.4
        shift = (0.0, 0.0) if turn else tuple(float(s) for s in rng.uniform(1.5, 5, 2) * rng.choice((-1, 1), 2))
        return {**p, "moved": (part, *shift, bool(turn))}

    def cut(p, rng):
        trace = np.array(traces[rng.integers(len(traces))], np.float32)
        k = rng.integers(len(trace) - 1)
        x, y = trace[k] + rng.uniform(0.2, 0.8) * (trace[k + 1] - trace[k])
        return {**p, "cut": (float(x), float(y), float(rng.uniform(1.2, 3.2)))}

    return sample, draw, {"missing_part": _structural(missing), "misplaced_part": _structural(moved),
                          "broken_trace": _structural(cut)}


# --------------------------------------------------------------------------- defects
def _place(fg, rng, margin=8):
    """A random defect centre on the foreground, away from the image border."""
    ys, xs = np.nonzero(fg[margin:-margin, margin:-margin])
    i = rng.integers(len(ys))
    return xs[i] + margin + rng.uniform(-0.5, 0.5), ys[i] + margin + rng.uniform(-0.5, 0.5)


def _scratch(img, fg, rng, width=(0.4, 1.5), length=(10, 55), strength=(0.15, 0.6), colour=None, jagged=0.08):
    """A thin curve (scratch) or, with large `jagged`, a zig-zag one (crack); dark or bright."""
    x, y = _place(fg, rng)
    heading, bend = rng.uniform(0, 2 * np.pi), rng.uniform(-0.5, 0.5)
    turns = heading + bend * np.linspace(0, 1, 14) + np.cumsum(rng.normal(0, jagged, 14))
    steps = np.stack([np.cos(turns), np.sin(turns)], 1) * rng.uniform(*length) / 14
    points = np.vstack([[x, y], [x, y] + np.cumsum(steps, 0)])
    alpha = np.clip(rng.uniform(*width) + 0.5 - _polyline_distance(points), 0, 1) * fg
    if colour is None:
        colour = (1.0, 1.0, 1.0) if rng.random() < 0.5 else (0.0, 0.0, 0.0)
    return _mix(img, colour, alpha * rng.uniform(*strength)), alpha > 0.3


def _crack(img, fg, rng, **kw):
    return _scratch(img, fg, rng, **{"width": (0.3, 1.1), "length": (12, 50), "strength": (0.35, 0.9),
                                     "colour": (0.03, 0.03, 0.03), "jagged": 0.6, **kw})


def _spot(img, fg, rng, radius=(2, 9), colour=(0.03, 0.03, 0.03), strength=(0.6, 0.95), rim=0.25):
    """A filled irregular blob: a hole (dark, with a lit rim) or a particle of dirt."""
    x, y = _place(fg, rng)
    sd = _blob(rng, x, y, rng.uniform(*radius))
    alpha = _cover(sd) * fg
    img = _mix(img, (1.0, 1.0, 1.0), rim * _cover(np.abs(sd + 0.5) - 0.6) * fg)
    return _mix(img, colour, alpha * rng.uniform(*strength)), alpha > 0.5


def _stain(img, fg, rng, tint=(0.75, 0.6, 0.45), radius=(4, 18), strength=(0.2, 0.8), blur=0.0):
    """A soft-edged blob that multiplies the colour by `tint` (liquid, rust, dry grass); with `blur`
    it also smooths the texture underneath, as oil filling the gaps between stones does."""
    x, y = _place(fg, rng)
    alpha = np.clip(0.5 - _blob(rng, x, y, rng.uniform(*radius)) / rng.uniform(1.5, 4), 0, 1) * fg
    under = ndimage.gaussian_filter(img, (blur, blur, 0)) if blur else img
    return _mix(img, under * np.asarray(tint, np.float32), alpha * rng.uniform(*strength)), alpha > 0.5


def _foreign_patch(img, fg, rng, donor, radius=(5, 16)):
    """Paste a blob cut from a normal image of another category."""
    donor_cat = _CATEGORIES[donor]
    patch, _ = donor_cat.draw(donor_cat.sample(rng))
    x, y = _place(fg, rng)
    alpha = _cover(_blob(rng, x, y, rng.uniform(*radius)) / 1.5) * fg
    return _mix(img, patch, alpha), alpha > 0.5


def _erase_print(img, fg, rng):
    """Wipe a patch of printed text back to paper; the mask keeps only pixels that lost ink."""
    paper = ndimage.maximum_filter(img, size=(9, 9, 1))
    u, v = _frame(*_place(fg, rng), rng.uniform(-0.1, 0.1))
    alpha = _cover(_box(u, v, rng.uniform(4, 16), rng.uniform(3, 7)))
    erased = _mix(img, paper, alpha)
    return erased, ndimage.binary_dilation(np.abs(erased - img).max(-1) > 0.08)


def _double_print(img, fg, rng):
    """Ghosting: a patch of text printed a second time a few pixels off."""
    shifted = np.roll(img, rng.integers(2, 5, 2) * rng.choice((-1, 1), 2), (0, 1))
    u, v = _frame(*_place(fg, rng), rng.uniform(-0.1, 0.1))
    alpha = _cover(_box(u, v, rng.uniform(8, 20), rng.uniform(5, 10))) * rng.uniform(0.4, 0.9)
    ghosted = _mix(img, np.minimum(img, shifted), alpha)
    return ghosted, ndimage.binary_dilation(np.abs(ghosted - img).max(-1) > 0.08)


def _surface(fn, **kw):
    return lambda cat, params, img, fg, rng: fn(img, fg, rng, **kw)


def _structural(modify):
    def apply(cat, params, img, fg, rng):
        broken, _ = cat.draw(modify(params, rng))
        return broken, np.abs(broken - img).max(-1) > 0.03
    return apply


# --------------------------------------------------------------------------- the categories
@dataclass(frozen=True)
class _Category:
    sample: Callable
    draw: Callable
    defects: dict                     # name -> fn(category, params, image, foreground, rng) -> (image, mask)
    gray: bool = False                # stored as 8-bit L, like MVTec's grid, screw and zipper


_GRAY = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
_CATEGORIES = {
    "brick_wall": _Category(*_photo_texture("brick", 1.0, 0.05, (0.25, 0.08, 0.05), (0.95, 0.55, 0.42)), {
        "crack": _surface(_crack), "hole": _surface(_spot),
        "stain": _surface(_stain, tint=(1.25, 1.25, 1.35), strength=(0.15, 0.7))}),
    "stone_wall": _Category(*_photo_texture("brick", 1.8, 0.05, *_GRAY, gamma=1.4), {
        "crack": _surface(_crack, width=(0.3, 0.9), strength=(0.2, 0.6)),
        "foreign_patch": _surface(_foreign_patch, donor="grass", radius=(4, 10))}, gray=True),
    "grass": _Category(*_photo_texture("grass", 1.0, np.pi, (0.05, 0.14, 0.03), (0.58, 0.86, 0.36)), {
        "dry_patch": _surface(_stain, tint=(1.6, 1.1, 0.6), radius=(6, 22), strength=(0.4, 0.9)),
        "foreign_patch": _surface(_foreign_patch, donor="gravel")}),
    "gravel": _Category(*_photo_texture("gravel", 1.0, np.pi, *_GRAY), {
        "hole": _surface(_spot, radius=(3, 10)),
        "oil_stain": _surface(_stain, tint=(0.3, 0.3, 0.3), radius=(8, 20), strength=(0.7, 0.95), blur=4.0),
        "foreign_patch": _surface(_foreign_patch, donor="wood")}, gray=True),
    "sand": _Category(*_photo_texture("gravel", 2.0, np.pi, (0.45, 0.36, 0.22), (0.98, 0.9, 0.72)), {
        "wet_spot": _surface(_stain, tint=(0.6, 0.55, 0.5), strength=(0.4, 0.9)),
        "foreign_patch": _surface(_foreign_patch, donor="gravel")}),
    "wood": _Category(_wood_sample, _wood_draw, {
        "scratch": _surface(_scratch), "hole": _surface(_spot, radius=(1.5, 6)),
        "stain": _surface(_stain, tint=(0.45, 0.55, 0.75), radius=(6, 20), strength=(0.4, 0.9))}),
    "carpet": _Category(_carpet_sample, _carpet_draw, {
        "hole": _surface(_spot, radius=(2, 8)), "stain": _surface(_stain, tint=(1.3, 0.9, 0.6)),
        "thread": _surface(_scratch, width=(0.5, 1.2), length=(20, 60), strength=(0.5, 0.9),
                           colour=(0.85, 0.2, 0.15))}),
    "metal_mesh": _Category(_mesh_sample, _mesh_draw, {
        "broken_wire": _structural(_mesh_cut), "bent_wire": _structural(_mesh_bend),
        "contamination": _surface(_spot, radius=(2.5, 6), colour=(0.55, 0.45, 0.3), strength=(0.4, 0.9), rim=0.0)},
        gray=True),
    "screw": _Category(_screw_sample, _screw_draw, {
        "missing_tip": _structural(_screw_missing_tip), "worn_thread": _structural(_screw_worn_thread),
        "scratch": _surface(_scratch, width=(0.8, 1.6), length=(8, 25), strength=(0.5, 0.9))}, gray=True),
    "hex_nut": _Category(_nut_sample, _nut_draw, {
        "chip": _structural(_nut_chip), "crack": _surface(_crack, length=(8, 30), strength=(0.25, 0.7)),
        "rust": _surface(_stain, tint=(0.8, 0.45, 0.25), radius=(3, 12), strength=(0.15, 0.6))}),
    "pill": _Category(_pill_sample, _pill_draw, {
        "chip": _structural(_pill_chip), "crack": _surface(_crack, length=(10, 40)),
        "contamination": _surface(_spot, radius=(1, 4), colour=(0.3, 0.25, 0.45), strength=(0.3, 0.9), rim=0.0)}),
    "coin": _Category(_coin_sample, _coin_draw, {
        "scratch": _surface(_scratch, width=(0.8, 1.8), length=(10, 40), strength=(0.5, 0.95),
                            colour=(1.0, 1.0, 1.0)),
        "tarnish": _surface(_stain, tint=(0.4, 0.4, 0.4), radius=(5, 16), strength=(0.5, 0.95))},
        gray=True),
    "coffee_cup": _Category(*_photo_object("coffee", (300, 190), 10, 2.4, 0.1, 58), {
        "crack": _surface(_crack), "stain": _surface(_stain, tint=(0.55, 0.45, 0.35)),
        "foreign_patch": _surface(_foreign_patch, donor="carpet", radius=(4, 12))}),
    "circuit_board": _Category(*_pcb_category("board_a")),
    "printed_text": _Category(*_photo_object("page", (200, 92), 6, 0.8, 0.03, SIZE), {
        "smudge": _surface(_stain, tint=(0.45, 0.45, 0.45), radius=(3, 12), strength=(0.2, 0.7)),
        "double_print": _surface(_double_print), "missing_print": _surface(_erase_print),
        "scratch": _surface(_scratch, length=(15, 55), strength=(0.4, 0.8))}, gray=True),
}
EMBEDDED_CATEGORIES = tuple(sorted(_CATEGORIES))
# a second, separate set: four look-alike designs of one board, for routing (the `boards` data)
_BOARDS = {name: _Category(*_pcb_category(name)) for name in _PCB_DESIGNS}
FAMILIES = {"embedded": _CATEGORIES, "boards": _BOARDS}


# --------------------------------------------------------------------------- writing
def _make_sample(cat, rng, defect):
    """One (image, mask) pair; mask is None for a normal image. Invisible defects are redrawn."""
    for _ in range(50):
        params = cat.sample(rng)
        img, fg = cat.draw(params)
        if defect is None:
            return img, None
        broken, mask = cat.defects[defect](cat, params, img, fg, rng)
        if mask.sum() >= MIN_DEFECT_PIXELS:
            return broken, mask
    raise RuntimeError(f"could not place a visible '{defect}' defect in 50 tries; check its size range")


def _finish(img, gray, rng):
    """Per-image exposure jitter, then 8-bit quantisation: (H, W) for grey categories, else (H, W, 3).

    No sensor noise is added: one grey level of noise triples the PNG size of a plain object image
    and is invisible to CNN features anyway.
    """
    if gray:
        img = img.mean(-1)
    img = img * rng.uniform(0.93, 1.07) + rng.uniform(-0.03, 0.03)
    return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)


def _save_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG", compress_level=3)   # no metadata: bytes reproducible


def _write_category(root, name, seed, family="embedded"):
    """Write one category's MVTec-style tree under root/name; returns its image counts."""
    cat = FAMILIES[family][name]
    rng = np.random.default_rng(seed + sorted(FAMILIES[family]).index(name))
    splits = [("train/good", None, N_TRAIN), ("test/good", None, N_TEST_GOOD)]
    splits += [(f"test/{defect}", defect, N_PER_DEFECT) for defect in cat.defects]
    counts = {}
    for folder, defect, n in splits:
        for i in range(n):
            img, mask = _make_sample(cat, rng, defect)
            _save_png(root / name / folder / f"{i:03d}.png", _finish(img, cat.gray, rng))
            if mask is not None:
                _save_png(root / name / "ground_truth" / defect / f"{i:03d}_mask.png", mask.astype(np.uint8) * 255)
        counts[folder] = n
    return counts


def _read_marker(out):
    try:
        return json.loads((Path(out) / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _is_complete(out, wanted):
    marker = _read_marker(out)
    return marker is not None and all(marker.get(key) == value for key, value in wanted.items())


def _remove_stale_builds(out):
    """Delete <out>.tmp-<pid> folders left by builds whose process no longer exists."""
    for tmp in out.parent.glob(out.name + ".tmp-*"):
        try:
            os.kill(int(tmp.name.rsplit("-", 1)[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except (ValueError, PermissionError):
            pass


def build_embedded(out: str | Path, seed: int = 0, progress: bool = True,
                   categories: Iterable[str] | None = None, family: str = "embedded") -> Path:
    """Build the embedded benchmark (``family="boards"``: the four board designs) at `out` in
    MVTec-AD layout and return `out`.

    `categories` picks a subset (default: all of the family's); a category's files do not
    depend on which others are built. The tree is written to <out>.tmp-<pid> and renamed into
    place, with the marker <out>/.complete written last, so an interrupted build never looks
    finished. A complete build with the same seed and categories is reused as it is.
    """
    out = Path(out)
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {list(FAMILIES)}")
    members = sorted(FAMILIES[family])
    names = members if categories is None else sorted(set(categories))
    unknown = sorted(set(names) - set(members))
    if unknown:
        raise ValueError(f"unknown {family} categories {unknown}; choose from {members}")
    wanted = {"format_version": FORMAT_VERSION, "seed": seed, "categories": names}
    if family != "embedded":
        wanted["family"] = family
    if _is_complete(out, wanted):
        return out
    if out.exists() and _read_marker(out) is None and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and has no {MARKER} marker, so it was not written by build_embedded; "
                              "delete it or choose another --out")

    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(out)
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        counts = {name: _write_category(tmp, name, seed, family)
                  for name in tqdm(names, desc="embedded benchmark" if family == "embedded" else f"{family} data", unit="category", disable=not progress)}
        record = {**wanted, "image_size": SIZE, "counts": counts}
        (tmp / MARKER).write_text(json.dumps(record, indent=1, sort_keys=True))
        if _is_complete(out, wanted):   # a concurrent build of the same thing finished first
            shutil.rmtree(tmp)
            return out
        if out.exists():                # an earlier build with another seed, subset or version
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
