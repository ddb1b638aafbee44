//! Image and array files: RGB8 images from/to model tensors, PNG with generation metadata,
//! and float32 `.npy` arrays. Every file is written to a temporary file in the target
//! folder and renamed into place, so an existing file is never left half-written.

use std::io::{BufWriter, Write};
use std::path::Path;

use diffusion_core::{Error, Result};
use npyz::WriterBuilder;

/// An 8-bit RGB image, row-major, `height * width * 3` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Interleaved RGB bytes.
    pub pixels: Vec<u8>,
}

impl RgbImage {
    /// Converts one image of a `[3, H, W]` float array in `[0, 1]` (channel-major) to RGB8,
    /// rounding as diffusers' `numpy_to_pil` does (`(x * 255).round()`).
    pub fn from_chw_unit(data: &[f32], height: usize, width: usize) -> Result<Self> {
        if data.len() != 3 * height * width {
            return Err(Error::Shape(format!(
                "{} values for a 3x{height}x{width} image",
                data.len()
            )));
        }
        let plane = height * width;
        let mut pixels = Vec::with_capacity(3 * plane);
        for i in 0..plane {
            for c in 0..3 {
                pixels.push(unit_to_u8(data[c * plane + i]));
            }
        }
        Ok(Self {
            width: width as u32,
            height: height as u32,
            pixels,
        })
    }

    /// The image as a `[3, H, W]` float array in `[0, 1]`.
    pub fn to_chw_unit(&self) -> Vec<f32> {
        let plane = (self.width * self.height) as usize;
        let mut out = vec![0.0; 3 * plane];
        for i in 0..plane {
            for c in 0..3 {
                out[c * plane + i] = self.pixels[3 * i + c] as f32 / 255.0;
            }
        }
        out
    }

    /// Reads a PNG or JPEG file (any colour type; converted to RGB8).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let img = image::open(path).map_err(|e| match e {
            image::ImageError::IoError(io) => Error::io(path, io),
            other => Error::InvalidArgument(format!("{}: {other}", path.display())),
        })?;
        let rgb = img.to_rgb8();
        Ok(Self {
            width: rgb.width(),
            height: rgb.height(),
            pixels: rgb.into_raw(),
        })
    }

    /// Writes a PNG with `metadata` as `tEXt` chunks (key, value), atomically.
    pub fn save_png(&self, path: impl AsRef<Path>, metadata: &[(String, String)]) -> Result<()> {
        let path = path.as_ref();
        write_atomically(path, |w| {
            let mut encoder = png::Encoder::new(w, self.width, self.height);
            encoder.set_color(png::ColorType::Rgb);
            encoder.set_depth(png::BitDepth::Eight);
            for (k, v) in metadata {
                encoder
                    .add_itxt_chunk(k.clone(), v.clone())
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
            }
            let mut writer = encoder
                .write_header()
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            writer
                .write_image_data(&self.pixels)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            writer
                .finish()
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            Ok(())
        })
    }
}

/// Reads the text chunks (`tEXt`, `zTXt`, `iTXt`) of a PNG file.
pub fn read_png_text(path: impl AsRef<Path>) -> Result<Vec<(String, String)>> {
    let path = path.as_ref();
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let decoder = png::Decoder::new(std::io::BufReader::new(file));
    let reader = decoder
        .read_info()
        .map_err(|e| Error::InvalidArgument(format!("{}: {e}", path.display())))?;
    let info = reader.info();
    let mut out: Vec<(String, String)> = info
        .uncompressed_latin1_text
        .iter()
        .map(|c| (c.keyword.clone(), c.text.clone()))
        .collect();
    for c in &info.utf8_text {
        if let Ok(text) = c.get_text() {
            out.push((c.keyword.clone(), text));
        }
    }
    Ok(out)
}

fn unit_to_u8(x: f32) -> u8 {
    (x.clamp(0.0, 1.0) * 255.0).round() as u8
}

/// Writes `path` through a temporary file in the same folder, renamed into place only when
/// `write` succeeded; on failure the previous file (if any) is untouched.
pub fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<&mut std::fs::File>) -> std::io::Result<()>,
) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| Error::io(dir, e))?;
    {
        let mut w = BufWriter::new(tmp.as_file_mut());
        write(&mut w).map_err(|e| Error::io(path, e))?;
        w.flush().map_err(|e| Error::io(path, e))?;
    }
    tmp.as_file().sync_all().map_err(|e| Error::io(path, e))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

/// A float32 array read from or written to a `.npy` file.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyArray {
    /// The array's shape.
    pub shape: Vec<usize>,
    /// Row-major values.
    pub data: Vec<f32>,
}

impl NpyArray {
    /// Reads a C-order float32 (or float64, converted) `.npy` file.
    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let bad = |m: String| {
            Error::InvalidArgument(format!("{}: not a usable .npy file: {m}", path.display()))
        };
        let npy = npyz::NpyFile::new(&bytes[..]).map_err(|e| bad(e.to_string()))?;
        if npy.order() != npyz::Order::C {
            return Err(bad("Fortran-order arrays are not supported".into()));
        }
        let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
        let dtype = npy.dtype();
        let data: Vec<f32> = match &dtype {
            npyz::DType::Plain(t)
                if t.type_char() == npyz::TypeChar::Float && t.size_field() == 4 =>
            {
                npy.into_vec::<f32>().map_err(|e| bad(e.to_string()))?
            }
            npyz::DType::Plain(t)
                if t.type_char() == npyz::TypeChar::Float && t.size_field() == 8 =>
            {
                npy.into_vec::<f64>()
                    .map_err(|e| bad(e.to_string()))?
                    .into_iter()
                    .map(|v| v as f32)
                    .collect()
            }
            other => {
                return Err(bad(format!(
                    "dtype {} is not float32/float64",
                    other.descr()
                )));
            }
        };
        if data.len() != shape.iter().product::<usize>() {
            return Err(bad("data length does not match the header's shape".into()));
        }
        Ok(Self { shape, data })
    }

    /// Writes a C-order float32 `.npy` file, atomically.
    pub fn write(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        if self.data.len() != self.shape.iter().product::<usize>() {
            return Err(Error::Shape(format!(
                "{} values for shape {:?}",
                self.data.len(),
                self.shape
            )));
        }
        write_atomically(path, |w| {
            let shape: Vec<u64> = self.shape.iter().map(|&d| d as u64).collect();
            let mut writer = npyz::WriteOptions::<f32>::new()
                .default_dtype()
                .shape(&shape)
                .writer(w)
                .begin_nd()?;
            writer.extend(self.data.iter().copied())?;
            writer.finish()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_roundtrip_keeps_pixels_and_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.png");
        let data: Vec<f32> = (0..3 * 4 * 5).map(|i| (i as f32) / 60.0).collect();
        let img = RgbImage::from_chw_unit(&data, 4, 5).unwrap();
        let meta = vec![("prompt".to_string(), "a red circle ✓".to_string())];
        img.save_png(&path, &meta).unwrap();
        let back = RgbImage::open(&path).unwrap();
        assert_eq!(back, img);
        assert_eq!(read_png_text(&path).unwrap(), meta);
        let again = back.to_chw_unit();
        for (a, b) in again.iter().zip(&data) {
            assert!((a - b).abs() <= 0.5 / 255.0 + 1e-6);
        }
    }

    #[test]
    fn npy_roundtrip_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.npy");
        let a = NpyArray {
            shape: vec![2, 3],
            data: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.5],
        };
        a.write(&path).unwrap();
        assert_eq!(NpyArray::read(&path).unwrap(), a);
        std::fs::write(&path, b"garbage").unwrap();
        assert!(matches!(
            NpyArray::read(&path),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            NpyArray::read(dir.path().join("missing.npy")),
            Err(Error::Io { .. })
        ));
        let bad = NpyArray {
            shape: vec![4],
            data: vec![1.0],
        };
        assert!(bad.write(&path).is_err());
    }

    #[test]
    fn wrong_sized_image_data_is_an_error() {
        assert!(RgbImage::from_chw_unit(&[0.0; 5], 1, 2).is_err());
    }
}
