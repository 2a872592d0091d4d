//! Seeded per-image data augmentation on CHW `f32` images with pixels in `[0, 1]`.
//!
//! The primitives ([`hflip`], [`crop_padded`], [`scale_about_centre`], [`adjust_brightness`],
//! [`adjust_contrast`]) take explicit parameters and are pure. [`Augment`] draws those
//! parameters from a generator seeded by `(seed, epoch, image index, op)`, so an image gets the
//! same augmentation whichever thread computes it and in whatever order; each op has its own
//! generator, so switching one op on or off does not change what the others draw.
//!
//! Ops run in a fixed order: flip, scale, crop, brightness, contrast.

use super::{derive_seed, DataError};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn check(img_len: usize, shape: [usize; 3], what: &str) -> Result<(), DataError> {
    let n = shape[0].checked_mul(shape[1]).and_then(|v| v.checked_mul(shape[2]));
    if n != Some(img_len) {
        return Err(DataError::Invalid(format!(
            "{what}: image has {img_len} values but shape {shape:?}"
        )));
    }
    Ok(())
}

/// Mirrors a CHW image left-right in place.
pub fn hflip(img: &mut [f32], shape: [usize; 3]) -> Result<(), DataError> {
    check(img.len(), shape, "hflip")?;
    let w = shape[2];
    for row in img.chunks_exact_mut(w) {
        row.reverse();
    }
    Ok(())
}

/// Zero-pads `src` by `pad` pixels on every side, then crops an `H x W` window whose top-left
/// corner is at `(dy, dx)` in the padded image (`dy, dx <= 2 * pad`), writing it to `dst`:
/// `dst[c][y][x] = src[c][y + dy - pad][x + dx - pad]`, or 0 outside `src`.
/// `(dy, dx) = (pad, pad)` is the identity.
pub fn crop_padded(
    dst: &mut [f32],
    src: &[f32],
    shape: [usize; 3],
    pad: usize,
    dy: usize,
    dx: usize,
) -> Result<(), DataError> {
    check(src.len(), shape, "crop_padded src")?;
    check(dst.len(), shape, "crop_padded dst")?;
    if dy > 2 * pad || dx > 2 * pad {
        return Err(DataError::Invalid(format!(
            "crop offset ({dy}, {dx}) outside the {}-pixel range of padding {pad}",
            2 * pad
        )));
    }
    let [c, h, w] = shape;
    for ch in 0..c {
        for y in 0..h {
            let sy = (y + dy) as isize - pad as isize;
            let drow = &mut dst[(ch * h + y) * w..(ch * h + y + 1) * w];
            if sy < 0 || sy >= h as isize {
                drow.fill(0.0);
                continue;
            }
            let srow = &src[(ch * h + sy as usize) * w..(ch * h + sy as usize + 1) * w];
            for (x, d) in drow.iter_mut().enumerate() {
                let sx = (x + dx) as isize - pad as isize;
                *d = if sx < 0 || sx >= w as isize { 0.0 } else { srow[sx as usize] };
            }
        }
    }
    Ok(())
}

/// Zooms `src` by `factor` about the image centre with bilinear sampling, keeping the size
/// (so `factor > 1` crops the zoomed image, `factor < 1` pads it with zeros):
/// `dst(y, x) = bilinear(src, cy + (y - cy) / factor, cx + (x - cx) / factor)` with
/// `c = (size - 1) / 2` and taps outside `src` reading 0. `factor = 1` is the identity.
pub fn scale_about_centre(
    dst: &mut [f32],
    src: &[f32],
    shape: [usize; 3],
    factor: f32,
) -> Result<(), DataError> {
    check(src.len(), shape, "scale src")?;
    check(dst.len(), shape, "scale dst")?;
    if !(factor.is_finite() && factor > 0.0) {
        return Err(DataError::Invalid(format!("scale factor {factor} must be finite and > 0")));
    }
    let [c, h, w] = shape;
    let (cy, cx) = ((h as f32 - 1.0) * 0.5, (w as f32 - 1.0) * 0.5);
    let tap = |plane: &[f32], y: isize, x: isize| -> f32 {
        if y < 0 || x < 0 || y >= h as isize || x >= w as isize {
            0.0
        } else {
            plane[y as usize * w + x as usize]
        }
    };
    for ch in 0..c {
        let plane = &src[ch * h * w..(ch + 1) * h * w];
        for y in 0..h {
            let sy = cy + (y as f32 - cy) / factor;
            let y0 = sy.floor();
            let fy = sy - y0;
            for x in 0..w {
                let sx = cx + (x as f32 - cx) / factor;
                let x0 = sx.floor();
                let fx = sx - x0;
                let (y0, x0) = (y0 as isize, x0 as isize);
                let top = tap(plane, y0, x0) * (1.0 - fx)
                    + if fx > 0.0 { tap(plane, y0, x0 + 1) * fx } else { 0.0 };
                let bot = if fy > 0.0 {
                    tap(plane, y0 + 1, x0) * (1.0 - fx)
                        + if fx > 0.0 { tap(plane, y0 + 1, x0 + 1) * fx } else { 0.0 }
                } else {
                    0.0
                };
                dst[(ch * h + y) * w + x] = top * (1.0 - fy) + bot * fy;
            }
        }
    }
    Ok(())
}

/// Multiplies every pixel by `factor` and clamps to `[0, 1]` (torchvision `adjust_brightness`).
pub fn adjust_brightness(img: &mut [f32], factor: f32) {
    for v in img {
        *v = (*v * factor).clamp(0.0, 1.0);
    }
}

/// Blends every pixel with the image's mean grey level `m`: `x' = clamp(m + factor * (x - m))`
/// (torchvision `adjust_contrast`; for 3 channels `m` is the mean of the luma
/// `0.299 R + 0.587 G + 0.114 B`, otherwise the mean of all values).
pub fn adjust_contrast(img: &mut [f32], shape: [usize; 3], factor: f32) -> Result<(), DataError> {
    check(img.len(), shape, "adjust_contrast")?;
    let plane = shape[1] * shape[2];
    let m = if shape[0] == 3 {
        let (r, g, b) = (&img[..plane], &img[plane..2 * plane], &img[2 * plane..]);
        let s: f64 = (0..plane)
            .map(|i| 0.299 * r[i] as f64 + 0.587 * g[i] as f64 + 0.114 * b[i] as f64)
            .sum();
        (s / plane as f64) as f32
    } else {
        (img.iter().map(|&v| v as f64).sum::<f64>() / img.len() as f64) as f32
    };
    for v in img.iter_mut() {
        *v = (m + factor * (*v - m)).clamp(0.0, 1.0);
    }
    Ok(())
}

/// A random augmentation pipeline; every field at its default switches that op off.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Augment {
    /// Mirror left-right with probability 1/2.
    pub hflip: bool,
    /// Zero-pad by this many pixels, then crop back at a uniform random offset (0 = off).
    pub crop_pad: usize,
    /// Zoom about the centre by a factor uniform in `[lo, hi]` (bilinear, zero fill).
    pub scale: Option<(f32, f32)>,
    /// Multiply by a brightness factor uniform in `[1 - b, 1 + b]` (0 = off).
    pub brightness: f32,
    /// Contrast factor uniform in `[1 - c, 1 + c]` (0 = off).
    pub contrast: f32,
}

const OP_FLIP: u64 = 1;
const OP_SCALE: u64 = 2;
const OP_CROP: u64 = 3;
const OP_BRIGHT: u64 = 4;
const OP_CONTRAST: u64 = 5;

impl Augment {
    /// Checks the parameters: scale bounds finite with `0 < lo <= hi`, jitter amounts in `[0, 1]`.
    pub fn validate(&self) -> Result<(), DataError> {
        if let Some((lo, hi)) = self.scale {
            if !(lo.is_finite() && hi.is_finite() && lo > 0.0 && lo <= hi) {
                return Err(DataError::Invalid(format!(
                    "augment scale range ({lo}, {hi}) must satisfy 0 < lo <= hi"
                )));
            }
        }
        for (name, v) in [("brightness", self.brightness), ("contrast", self.contrast)] {
            if !(0.0..=1.0).contains(&v) {
                return Err(DataError::Invalid(format!("augment {name} {v} must be in [0, 1]")));
            }
        }
        Ok(())
    }

    /// Whether every op is off.
    pub fn is_identity(&self) -> bool {
        *self == Augment::default()
    }

    fn rng(seed: u64, epoch: u64, index: u64, op: u64) -> StdRng {
        StdRng::seed_from_u64(derive_seed(seed, &[epoch, index, op]))
    }

    /// Augments image `index` of epoch `epoch` in place; the result depends only on
    /// `(self, seed, epoch, index)` and the pixels.
    pub fn apply(
        &self,
        img: &mut [f32],
        shape: [usize; 3],
        seed: u64,
        epoch: u64,
        index: u64,
    ) -> Result<(), DataError> {
        self.validate()?;
        check(img.len(), shape, "augment")?;
        let mut scratch = Vec::new();
        if self.hflip && Self::rng(seed, epoch, index, OP_FLIP).random::<bool>() {
            hflip(img, shape)?;
        }
        if let Some((lo, hi)) = self.scale {
            let f = if lo < hi { Self::rng(seed, epoch, index, OP_SCALE).random_range(lo..=hi) } else { lo };
            scratch.clear();
            scratch.extend_from_slice(img);
            scale_about_centre(img, &scratch, shape, f)?;
        }
        if self.crop_pad > 0 {
            let mut r = Self::rng(seed, epoch, index, OP_CROP);
            let dy = r.random_range(0..=2 * self.crop_pad);
            let dx = r.random_range(0..=2 * self.crop_pad);
            scratch.clear();
            scratch.extend_from_slice(img);
            crop_padded(img, &scratch, shape, self.crop_pad, dy, dx)?;
        }
        if self.brightness > 0.0 {
            let b = self.brightness;
            let f = Self::rng(seed, epoch, index, OP_BRIGHT).random_range(1.0 - b..=1.0 + b);
            adjust_brightness(img, f);
        }
        if self.contrast > 0.0 {
            let c = self.contrast;
            let f = Self::rng(seed, epoch, index, OP_CONTRAST).random_range(1.0 - c..=1.0 + c);
            adjust_contrast(img, shape, f)?;
        }
        Ok(())
    }
}
