//! A procedural, captioned "shapes" dataset and an analyser that reads the attributes back
//! from pixels.
//!
//! Each image shows one shape (circle, square or triangle) of one colour and size at one
//! of nine positions on a plain background of another colour, captioned like
//! "a small red circle in the top left on a white background". Captions randomly leave out
//! the size and the position so that short prompts ("a red circle on a blue background")
//! are in distribution. Images are drawn with 4x4 supersampling for smooth edges.

use std::collections::HashSet;
use std::sync::LazyLock;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::image_io::RgbImage;

/// Shape kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Shape {
    /// A disc.
    Circle,
    /// An axis-aligned square.
    Square,
    /// An upright isosceles triangle.
    Triangle,
}

impl Shape {
    /// All shapes.
    pub const ALL: [Shape; 3] = [Shape::Circle, Shape::Square, Shape::Triangle];

    /// The word used in captions.
    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
        }
    }
}

/// Named colours and their RGB values.
pub const COLORS: [(&str, [u8; 3]); 8] = [
    ("red", [220, 30, 30]),
    ("green", [30, 170, 40]),
    ("blue", [30, 60, 220]),
    ("yellow", [240, 220, 30]),
    ("purple", [140, 40, 170]),
    ("orange", [245, 140, 20]),
    ("white", [245, 245, 245]),
    ("black", [20, 20, 20]),
];

/// Shape sizes: the caption word and the shape's extent as a fraction of the image side.
pub const SIZES: [(&str, f32); 2] = [("small", 0.28), ("large", 0.5)];

/// The nine positions, named as in captions, with centres in units of the image side.
pub const POSITIONS: [(&str, [f32; 2]); 9] = [
    ("top left", [0.25, 0.25]),
    ("top", [0.5, 0.25]),
    ("top right", [0.75, 0.25]),
    ("left", [0.25, 0.5]),
    ("center", [0.5, 0.5]),
    ("right", [0.75, 0.5]),
    ("bottom left", [0.25, 0.75]),
    ("bottom", [0.5, 0.75]),
    ("bottom right", [0.75, 0.75]),
];

/// The attributes of one shapes image (indices into [`COLORS`], [`SIZES`], [`POSITIONS`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ShapeScene {
    /// The shape drawn.
    pub shape: Shape,
    /// Index of the shape's colour in [`COLORS`].
    pub color: usize,
    /// Index of the background colour in [`COLORS`] (never equal to `color`).
    pub background: usize,
    /// Index of the size in [`SIZES`].
    pub size: usize,
    /// Index of the position in [`POSITIONS`].
    pub position: usize,
}

impl ShapeScene {
    /// A uniformly random scene.
    pub fn random(rng: &mut impl Rng) -> Self {
        let color = rng.random_range(0..COLORS.len());
        let mut background = rng.random_range(0..COLORS.len() - 1);
        if background >= color {
            background += 1;
        }
        Self {
            shape: Shape::ALL[rng.random_range(0..Shape::ALL.len())],
            color,
            background,
            size: rng.random_range(0..SIZES.len()),
            position: rng.random_range(0..POSITIONS.len()),
        }
    }

    /// The full caption: "a small red circle in the top left on a white background".
    pub fn caption(&self) -> String {
        self.caption_with(true, true)
    }

    /// A caption that mentions the size and/or the position only when asked.
    pub fn caption_with(&self, size: bool, position: bool) -> String {
        let mut s = String::from("a ");
        if size {
            s.push_str(SIZES[self.size].0);
            s.push(' ');
        }
        s.push_str(COLORS[self.color].0);
        s.push(' ');
        s.push_str(self.shape.name());
        if position {
            s.push_str(" in the ");
            s.push_str(POSITIONS[self.position].0);
        }
        s.push_str(" on a ");
        s.push_str(COLORS[self.background].0);
        s.push_str(" background");
        s
    }

    /// Draws the scene at `side` x `side` pixels.
    pub fn render(&self, side: u32) -> RgbImage {
        const SS: u32 = 4;
        let n = side as usize;
        let fg = COLORS[self.color].1;
        let bg = COLORS[self.background].1;
        let extent = SIZES[self.size].1;
        let [cx, cy] = POSITIONS[self.position].1;
        let half = extent / 2.0;
        let mut pixels = Vec::with_capacity(n * n * 3);
        for y in 0..side {
            for x in 0..side {
                let mut hits = 0u32;
                for sy in 0..SS {
                    for sx in 0..SS {
                        let px = (x as f32 + (sx as f32 + 0.5) / SS as f32) / side as f32;
                        let py = (y as f32 + (sy as f32 + 0.5) / SS as f32) / side as f32;
                        if self.contains(px - cx, py - cy, half) {
                            hits += 1;
                        }
                    }
                }
                let a = hits as f32 / (SS * SS) as f32;
                for c in 0..3 {
                    let v = a * fg[c] as f32 + (1.0 - a) * bg[c] as f32;
                    pixels.push(v.round() as u8);
                }
            }
        }
        RgbImage {
            width: side,
            height: side,
            pixels,
        }
    }

    fn contains(&self, dx: f32, dy: f32, half: f32) -> bool {
        match self.shape {
            Shape::Circle => dx * dx + dy * dy <= half * half,
            Shape::Square => dx.abs() <= half * 0.886 && dy.abs() <= half * 0.886,
            Shape::Triangle => {
                // apex at the top, base at the bottom; y grows downwards
                let top = -half;
                let bottom = half;
                if dy < top || dy > bottom {
                    return false;
                }
                let t = (dy - top) / (bottom - top);
                dx.abs() <= t * half
            }
        }
    }
}

/// How many scenes [`held_out_scenes`] holds back from training.
pub const HELD_OUT_COUNT: usize = 200;

/// The seed of the held-out scene draw (fixed: it defines the evaluation set).
const HELD_OUT_SEED: u64 = 0x5EED_0EA1;

static HELD_OUT: LazyLock<(Vec<ShapeScene>, HashSet<ShapeScene>)> = LazyLock::new(|| {
    let mut rng = ChaCha8Rng::seed_from_u64(HELD_OUT_SEED);
    let mut list = Vec::with_capacity(HELD_OUT_COUNT);
    let mut set = HashSet::with_capacity(HELD_OUT_COUNT);
    while list.len() < HELD_OUT_COUNT {
        let scene = ShapeScene::random(&mut rng);
        if set.insert(scene) {
            list.push(scene);
        }
    }
    (list, set)
});

/// The [`HELD_OUT_COUNT`] distinct scenes (of the 3024 shape x colour x background x size x
/// position combinations) that [`ShapesDataset`] never draws by default: the evaluation set
/// of the quality table (docs/QUALITY.md), so that it measures prompts the model has not
/// been trained on. Always the same scenes, in the same order.
pub fn held_out_scenes() -> &'static [ShapeScene] {
    &HELD_OUT.0
}

/// Whether `scene` is one of the [`held_out_scenes`].
pub fn is_held_out(scene: &ShapeScene) -> bool {
    HELD_OUT.1.contains(scene)
}

/// An endless, seeded stream of (image, caption) pairs.
#[derive(Debug, Clone)]
pub struct ShapesDataset {
    rng: ChaCha8Rng,
    side: u32,
    /// Probability that a caption mentions the size.
    pub p_size: f64,
    /// Probability that a caption mentions the position.
    pub p_position: f64,
    /// Skip the [`held_out_scenes`] (on by default).
    pub exclude_held_out: bool,
}

impl ShapesDataset {
    /// A dataset of `side` x `side` images, seeded.
    pub fn new(side: u32, seed: u64) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
            side,
            p_size: 0.5,
            p_position: 0.5,
            exclude_held_out: true,
        }
    }

    /// The generator behind the stream (its state is the stream's position, e.g. for
    /// checkpoints).
    pub fn rng(&self) -> &ChaCha8Rng {
        &self.rng
    }

    /// Mutable access to the generator, e.g. to restore a saved position.
    pub fn rng_mut(&mut self) -> &mut ChaCha8Rng {
        &mut self.rng
    }

    /// The image side in pixels.
    pub fn side(&self) -> u32 {
        self.side
    }

    /// The next example: the scene, its image and a caption.
    pub fn next_example(&mut self) -> (ShapeScene, RgbImage, String) {
        let mut scene = ShapeScene::random(&mut self.rng);
        while self.exclude_held_out && is_held_out(&scene) {
            scene = ShapeScene::random(&mut self.rng);
        }
        let size = self.rng.random_bool(self.p_size);
        let position = self.rng.random_bool(self.p_position);
        let caption = scene.caption_with(size, position);
        (scene, scene.render(self.side), caption)
    }
}

/// What the analyser reads back from an image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Analysis {
    /// Nearest palette colour of the shape.
    pub color: usize,
    /// Nearest palette colour of the background.
    pub background: usize,
    /// Best-matching shape.
    pub shape: Shape,
    /// Nearest size class.
    pub size: usize,
    /// Nearest of the nine positions.
    pub position: usize,
    /// Fraction of the image covered by the shape.
    pub coverage: f32,
}

fn nearest_color(rgb: [f32; 3]) -> usize {
    let mut best = (0, f32::MAX);
    for (i, (_, c)) in COLORS.iter().enumerate() {
        let d: f32 = (0..3).map(|k| (rgb[k] - c[k] as f32).powi(2)).sum();
        if d < best.1 {
            best = (i, d);
        }
    }
    best.0
}

/// Reads colour, background, shape, size and position back from a shapes image.
///
/// The background is the median colour of the border pixels; the shape is every pixel far
/// from it; its colour is the mean of those pixels, its position the centroid, its size the
/// square root of its area, and its kind the ratio of its area to its bounding box
/// (circle ~0.785, square ~1, triangle ~0.5). Returns `None` when no shape is visible.
pub fn analyse(image: &RgbImage) -> Option<Analysis> {
    let (w, h) = (image.width as usize, image.height as usize);
    let px = |x: usize, y: usize| {
        let i = 3 * (y * w + x);
        [
            image.pixels[i] as f32,
            image.pixels[i + 1] as f32,
            image.pixels[i + 2] as f32,
        ]
    };
    let mut border: Vec<[f32; 3]> = Vec::new();
    for x in 0..w {
        border.push(px(x, 0));
        border.push(px(x, h - 1));
    }
    for y in 0..h {
        border.push(px(0, y));
        border.push(px(w - 1, y));
    }
    let median = |k: usize| {
        let mut v: Vec<f32> = border.iter().map(|p| p[k]).collect();
        v.sort_by(f32::total_cmp);
        v[v.len() / 2]
    };
    let bg = [median(0), median(1), median(2)];
    let mut count = 0usize;
    let mut sum = [0f32; 3];
    let (mut sx, mut sy) = (0f32, 0f32);
    let (mut x0, mut x1, mut y0, mut y1) = (w, 0, h, 0);
    for y in 0..h {
        for x in 0..w {
            let p = px(x, y);
            let d: f32 = (0..3).map(|k| (p[k] - bg[k]).powi(2)).sum::<f32>().sqrt();
            if d > 80.0 {
                count += 1;
                for k in 0..3 {
                    sum[k] += p[k];
                }
                sx += x as f32 + 0.5;
                sy += y as f32 + 0.5;
                x0 = x0.min(x);
                x1 = x1.max(x);
                y0 = y0.min(y);
                y1 = y1.max(y);
            }
        }
    }
    if count < 4 {
        return None;
    }
    let n = count as f32;
    let mean = [sum[0] / n, sum[1] / n, sum[2] / n];
    let (cx, cy) = (sx / n / w as f32, sy / n / h as f32);
    let bbox = ((x1 - x0 + 1) * (y1 - y0 + 1)) as f32;
    let fill = n / bbox;
    let shape = if fill > 0.9 {
        Shape::Square
    } else if fill > 0.64 {
        Shape::Circle
    } else {
        Shape::Triangle
    };
    let coverage = n / (w * h) as f32;
    // Expected coverage of each size class for the detected shape.
    let area_factor = match shape {
        Shape::Circle => std::f32::consts::PI / 4.0,
        Shape::Square => 0.886 * 0.886,
        Shape::Triangle => 0.5,
    };
    let size = (0..SIZES.len())
        .min_by(|&a, &b| {
            let ea = (SIZES[a].1.powi(2) * area_factor - coverage).abs();
            let eb = (SIZES[b].1.powi(2) * area_factor - coverage).abs();
            ea.total_cmp(&eb)
        })
        .unwrap_or(0);
    // A triangle's centroid sits below its bounding-box centre; use the box centre.
    let (bx, by) = (
        (x0 + x1 + 1) as f32 / 2.0 / w as f32,
        (y0 + y1 + 1) as f32 / 2.0 / h as f32,
    );
    let (px_, py_) = if shape == Shape::Triangle {
        (bx, by)
    } else {
        (cx, cy)
    };
    let position = (0..POSITIONS.len())
        .min_by(|&a, &b| {
            let da = (POSITIONS[a].1[0] - px_).powi(2) + (POSITIONS[a].1[1] - py_).powi(2);
            let db = (POSITIONS[b].1[0] - px_).powi(2) + (POSITIONS[b].1[1] - py_).powi(2);
            da.total_cmp(&db)
        })
        .unwrap_or(0);
    Some(Analysis {
        color: nearest_color(mean),
        background: nearest_color(bg),
        shape,
        size,
        position,
        coverage,
    })
}

/// Prompt adherence over many generated images: how often the analyser reads back each
/// attribute the prompt asked for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct AdherenceScore {
    /// Images scored.
    pub images: usize,
    /// Images where a shape was found at all.
    pub found: usize,
    /// Shape colour correct.
    pub color: usize,
    /// Background colour correct.
    pub background: usize,
    /// Shape kind correct.
    pub shape: usize,
    /// Size class correct.
    pub size: usize,
    /// Position (of nine) correct.
    pub position: usize,
    /// All five attributes correct.
    pub all: usize,
}

impl AdherenceScore {
    /// Scores one image generated for `asked` (`read` is [`analyse`]'s answer; `None`
    /// counts as wrong on every attribute).
    pub fn add(&mut self, asked: &ShapeScene, read: Option<&Analysis>) {
        self.images += 1;
        let Some(a) = read else { return };
        self.found += 1;
        let ok = [
            a.color == asked.color,
            a.background == asked.background,
            a.shape == asked.shape,
            a.size == asked.size,
            a.position == asked.position,
        ];
        self.color += ok[0] as usize;
        self.background += ok[1] as usize;
        self.shape += ok[2] as usize;
        self.size += ok[3] as usize;
        self.position += ok[4] as usize;
        self.all += ok.iter().all(|&b| b) as usize;
    }

    /// `count / images` (0 when nothing was scored).
    pub fn rate(&self, count: usize) -> f64 {
        if self.images == 0 {
            0.0
        } else {
            count as f64 / self.images as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captions_read_naturally() {
        let s = ShapeScene {
            shape: Shape::Circle,
            color: 0,
            background: 6,
            size: 0,
            position: 0,
        };
        assert_eq!(
            s.caption(),
            "a small red circle in the top left on a white background"
        );
        assert_eq!(
            s.caption_with(false, false),
            "a red circle on a white background"
        );
    }

    /// The analyser reads back every attribute of rendered scenes (it is the judge of the
    /// quality table, so it must be right on clean images).
    #[test]
    fn analyser_recovers_rendered_attributes() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut correct = [0usize; 5];
        let total = 300;
        for _ in 0..total {
            let scene = ShapeScene::random(&mut rng);
            let a = analyse(&scene.render(64)).expect("shape visible");
            correct[0] += (a.color == scene.color) as usize;
            correct[1] += (a.background == scene.background) as usize;
            correct[2] += (a.shape == scene.shape) as usize;
            correct[3] += (a.size == scene.size) as usize;
            correct[4] += (a.position == scene.position) as usize;
        }
        assert_eq!(correct[0], total, "colour");
        assert_eq!(correct[1], total, "background");
        assert_eq!(correct[3], total, "size");
        assert_eq!(correct[4], total, "position");
        assert!(
            correct[2] as f64 >= 0.97 * total as f64,
            "shape {}",
            correct[2]
        );
    }

    #[test]
    fn held_out_scenes_are_distinct_and_never_drawn() {
        let held = held_out_scenes();
        assert_eq!(held.len(), HELD_OUT_COUNT);
        let set: HashSet<_> = held.iter().copied().collect();
        assert_eq!(set.len(), HELD_OUT_COUNT);
        let mut data = ShapesDataset::new(8, 1);
        for _ in 0..5000 {
            assert!(!set.contains(&data.next_example().0));
        }
        // Turned off, the stream does reach held-out scenes (3024 combinations).
        let mut data = ShapesDataset::new(8, 1);
        data.exclude_held_out = false;
        assert!((0..5000).any(|_| set.contains(&data.next_example().0)));
    }

    #[test]
    fn adherence_counts_each_attribute() {
        let asked = ShapeScene {
            shape: Shape::Square,
            color: 2,
            background: 6,
            size: 1,
            position: 4,
        };
        let mut score = AdherenceScore::default();
        score.add(&asked, analyse(&asked.render(64)).as_ref());
        let mut moved = asked;
        moved.position = 0;
        score.add(&asked, analyse(&moved.render(64)).as_ref());
        score.add(&asked, None);
        assert_eq!(
            (
                score.images,
                score.found,
                score.color,
                score.position,
                score.all
            ),
            (3, 2, 2, 1, 1)
        );
        assert!((score.rate(score.color) - 2.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn dataset_is_seeded() {
        let mut a = ShapesDataset::new(32, 9);
        let mut b = ShapesDataset::new(32, 9);
        for _ in 0..5 {
            assert_eq!(a.next_example().2, b.next_example().2);
        }
    }
}
