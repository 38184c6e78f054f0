//! The little dense linear algebra fold-in needs: dot products and a Cholesky solve of a
//! small symmetric positive-definite system. Written out by hand so no linear algebra
//! crate is pulled in for a k×k problem with k ≤ a few hundred.

/// Inner product of two equal-length slices, with independent accumulators so the
/// loop pipelines (and vectorises in optimised builds).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut tail = 0.0;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        tail += x * y;
    }
    (acc[0] + acc[4]) + (acc[1] + acc[5]) + (acc[2] + acc[6]) + (acc[3] + acc[7]) + tail
}

/// Adds `scale · v vᵀ` to the lower triangle (row-major, `k × k`) of `a`.
#[inline]
pub fn add_outer_lower(a: &mut [f32], k: usize, v: &[f32], scale: f32) {
    for r in 0..k {
        let s = scale * v[r];
        let row = &mut a[r * k..r * k + r + 1];
        for (x, y) in row.iter_mut().zip(&v[..=r]) {
            *x += s * y;
        }
    }
}

/// `f64` inner product with independent accumulators (a single running sum would make
/// the Cholesky loops latency-bound).
#[inline]
fn dot_f64(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f64; 4];
    let mut ca = a.chunks_exact(4);
    let mut cb = b.chunks_exact(4);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..4 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut tail = 0.0;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        tail += x * y;
    }
    (acc[0] + acc[2]) + (acc[1] + acc[3]) + tail
}

/// Solves `A x = b` for symmetric positive-definite `A` (`k × k`, row-major; only the
/// lower triangle is read) by Cholesky decomposition, in `f64`. `None` when `A` is not
/// numerically positive definite or the sizes disagree.
pub fn cholesky_solve(a: &[f32], b: &[f32], k: usize) -> Option<Vec<f32>> {
    if a.len() != k * k || b.len() != k {
        return None;
    }
    // Right-looking factorisation in place on an f64 copy of the lower triangle: after
    // step j, column j holds L's column j and the trailing block has been updated by it.
    // The inner loop is a contiguous axpy with no dependency chain.
    let mut l: Vec<f64> = a.iter().map(|v| f64::from(*v)).collect();
    let mut col = vec![0.0f64; k];
    for j in 0..k {
        let d = l[j * k + j];
        if !(d > 0.0 && d.is_finite()) {
            return None;
        }
        let d = d.sqrt();
        l[j * k + j] = d;
        for i in j + 1..k {
            l[i * k + j] /= d;
            col[i] = l[i * k + j];
        }
        for i in j + 1..k {
            let lij = col[i];
            let row = &mut l[i * k + j + 1..i * k + i + 1];
            for (x, c) in row.iter_mut().zip(&col[j + 1..=i]) {
                *x -= lij * c;
            }
        }
    }
    // Forward: L y = b.
    let mut y = vec![0.0f64; k];
    for i in 0..k {
        let sum = f64::from(b[i]) - dot_f64(&l[i * k..i * k + i], &y[..i]);
        y[i] = sum / l[i * k + i];
    }
    // Backward: Lᵀ x = y, column by column of Lᵀ (row by row of L), so the updates are
    // independent rather than one dependent chain.
    for i in (0..k).rev() {
        let xi = y[i] / l[i * k + i];
        y[i] = xi;
        for (yj, lij) in y[..i].iter_mut().zip(&l[i * k..i * k + i]) {
            *yj -= lij * xi;
        }
    }
    if y.iter().any(|v| !v.is_finite()) {
        return None;
    }
    Some(y.into_iter().map(|v| v as f32).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cholesky_solves_a_known_system() {
        // A = [[4, 12, -16], [12, 37, -43], [-16, -43, 98]] = L Lᵀ with
        // L = [[2, 0, 0], [6, 1, 0], [-8, 5, 3]]; pick x = [1, -2, 0.5], b = A x.
        let a = [4.0, 12.0, -16.0, 12.0, 37.0, -43.0, -16.0, -43.0, 98.0];
        let x = [1.0f32, -2.0, 0.5];
        let b: Vec<f32> = (0..3).map(|r| dot(&a[r * 3..r * 3 + 3], &x)).collect();
        let got = cholesky_solve(&a, &b, 3).unwrap();
        for (g, w) in got.iter().zip(&x) {
            assert!((g - w).abs() < 1e-4, "{got:?} vs {x:?}");
        }
    }

    #[test]
    fn cholesky_reads_only_the_lower_triangle_and_rejects_indefinite() {
        let a = [2.0, 999.0, 1.0, 3.0];
        let x = cholesky_solve(&a, &[3.0, 4.0], 2).unwrap();
        // [[2,1],[1,3]] x = [3,4] → x = [1, 1].
        assert!(
            (x[0] - 1.0).abs() < 1e-5 && (x[1] - 1.0).abs() < 1e-5,
            "{x:?}"
        );
        assert!(cholesky_solve(&[1.0, 0.0, 2.0, -1.0], &[1.0, 1.0], 2).is_none());
        assert!(cholesky_solve(&[1.0], &[1.0, 2.0], 2).is_none());
    }

    #[test]
    fn dots_agree() {
        let a: Vec<f32> = (0..19).map(|i| i as f32 * 0.5 - 3.0).collect();
        let b: Vec<f32> = (0..19).map(|i| (i as f32).sin()).collect();
        let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - naive).abs() < 1e-4);
        let mut m = vec![0.0; 4];
        add_outer_lower(&mut m, 2, &[1.0, 2.0], 2.0);
        assert_eq!(m, vec![2.0, 0.0, 4.0, 8.0]);
    }
}
