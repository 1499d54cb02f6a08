//! Helpers shared by mesh-core's integration tests.

/// Largest absolute difference between `got` and `want`, relative to `want`'s largest
/// magnitude: the measure every logits comparison here uses.
pub fn relative_error(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "compared vectors differ in length");
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
    got.iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max)
        / scale
}
