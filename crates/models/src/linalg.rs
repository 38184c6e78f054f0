//! The little dense linear algebra the models need: dot products, outer-product and
//! symmetric matrix–vector kernels, a Cholesky solve of a small symmetric
//! positive-definite system, and the in-place inverse of one (EASE's item × item fit,
//! up to a few thousand rows, in the background refit). Written out by hand so no linear
//! algebra crate is pulled in for these few kernels (a crate like faer would add much
//! build time and target-dir disk for one inverse).
//!
//! The Gram kernels ([`add_outer_lower`], [`sub_sym_product`]), on the learning and
//! fold-in paths, are compiled twice: for the baseline target, and for AVX2 with fused
//! multiply-add, picked at run time when the CPU has them (`std` caches the CPU check). A release build targets baseline x86-64 (SSE2,
//! 4 lanes, no FMA), where the Gram kernels ran at about a third of the AVX2 speed. The
//! two builds may differ in the last bits of a result (FMA rounds once), never more.

/// `a · b + c`, fused into one rounding when `FMA` (only in code compiled with the `fma`
/// target feature, where it is one instruction; elsewhere `mul_add` is a slow library call).
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

/// Whether the AVX2 + FMA builds of the kernels can run here.
#[cfg(target_arch = "x86_64")]
#[inline]
fn has_avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// Defines `$name` running `$generic::<true>` compiled for AVX2 + FMA when the CPU has
/// them, else `$generic::<false>` for the baseline target.
macro_rules! dispatched {
    ($(#[$doc:meta])* pub fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? = $generic:ident;) => {
        $(#[$doc])*
        #[inline]
        pub fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            if has_avx2_fma() {
                #[target_feature(enable = "avx2,fma")]
                fn fast($($arg: $ty),*) $(-> $ret)? {
                    $generic::<true>($($arg),*)
                }
                // SAFETY: `fast` needs AVX2 and FMA, and the CPU was just found to have
                // both. (Besides the prefetch hint in `factors`, the crate's only `unsafe`.)
                #[allow(unsafe_code)]
                return unsafe { fast($($arg),*) };
            }
            $generic::<false>($($arg),*)
        }
    };
}

/// Inner product of two equal-length slices (the shorter length if they differ), with
/// independent accumulators so the loop pipelines (and vectorises in optimised builds).
/// Not dispatched: it is inlined into loops over short vectors, where a call per dot
/// cost more than AVX2 saved.
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

/// Vectors summed together by one pass of [`add_outer_lower`] over the matrix.
pub const OUTER_BLOCK: usize = 8;

dispatched! {
    /// Adds `Σ_b weights[b] · v_b v_bᵀ` to the lower triangle (row-major, `k × k`) of
    /// `a`, where `vs` holds the `v_b` one after another (`k` values each). Entries above
    /// the diagonal are left in an unspecified state (the block that ends a row may run
    /// a few columns past it): read only the lower triangle.
    pub fn add_outer_lower(a: &mut [f32], k: usize, vs: &[f32], weights: &[f32]) = add_outer_lower_impl;
}

/// [`add_outer_lower`], [`OUTER_BLOCK`] vectors at a time, so each stretch of eight
/// entries of `a` is loaded and stored once per block rather than once per vector.
#[inline(always)]
fn add_outer_lower_impl<const FMA: bool>(a: &mut [f32], k: usize, vs: &[f32], weights: &[f32]) {
    if a.len() < k * k || vs.len() < weights.len() * k {
        return;
    }
    for (vs, weights) in vs.chunks(OUTER_BLOCK * k).zip(weights.chunks(OUTER_BLOCK)) {
        let nb = weights.len();
        let mut coeff = [0.0f32; OUTER_BLOCK];
        for r in 0..k {
            for (b, (c, w)) in coeff.iter_mut().zip(weights).enumerate() {
                *c = w * vs[b * k + r];
            }
            // Columns 0..=r, rounded up to whole eights where the row has room.
            let end = (r + 1).next_multiple_of(8).min(k);
            let row = &mut a[r * k..r * k + end];
            let c0 = add_block_row::<FMA, 32>(row, 0, end, k, vs, &coeff[..nb]);
            let c0 = add_block_row::<FMA, 8>(row, c0, end, k, vs, &coeff[..nb]);
            for (c, x) in row.iter_mut().enumerate().skip(c0) {
                for (b, cb) in coeff[..nb].iter().enumerate() {
                    *x = madd::<FMA>(*cb, vs[b * k + c], *x);
                }
            }
        }
    }
}

/// Adds `Σ_b coeff[b] · vs_b[c]` to `row[c]` for `c` from `c0` in whole stretches of `W`
/// columns while they fit before `end`; returns where it stopped. `W` sums stay in
/// registers across the block's vectors: with `W = 32`, four independent chains of
/// fused multiply-adds, where one chain of eight would wait on each add's latency.
#[inline(always)]
fn add_block_row<const FMA: bool, const W: usize>(
    row: &mut [f32],
    mut c0: usize,
    end: usize,
    k: usize,
    vs: &[f32],
    coeff: &[f32],
) -> usize {
    while c0 + W <= end {
        let mut acc = [0.0f32; W];
        acc.copy_from_slice(&row[c0..c0 + W]);
        for (b, cb) in coeff.iter().enumerate() {
            let v = &vs[b * k + c0..b * k + c0 + W];
            for l in 0..W {
                acc[l] = madd::<FMA>(*cb, v[l], acc[l]);
            }
        }
        row[c0..c0 + W].copy_from_slice(&acc);
        c0 += W;
    }
    c0
}

dispatched! {
    /// Subtracts `w · G p` from `out`, for a symmetric `G` (row-major, both triangles,
    /// `k × k` with `k = p.len()`).
    pub fn sub_sym_product(g: &[f32], w: f32, p: &[f32], out: &mut [f32]) = sub_sym_product_impl;
}

/// `G p` as the sum of `G`'s rows scaled by `p` (`G` is symmetric), in stretches of 64
/// columns (eight AVX2 registers of sums, eight independent chains of multiply-adds),
/// then of 8, then one by one: no horizontal sum per row and no store per multiply-add.
#[inline(always)]
fn sub_sym_product_impl<const FMA: bool>(g: &[f32], w: f32, p: &[f32], out: &mut [f32]) {
    let k = p.len();
    if g.len() < k * k || out.len() < k {
        return;
    }
    let c0 = sub_product_cols::<FMA, 64>(g, w, p, out, 0);
    let c0 = sub_product_cols::<FMA, 8>(g, w, p, out, c0);
    sub_product_cols::<FMA, 1>(g, w, p, out, c0);
}

/// [`sub_sym_product_impl`] for columns from `c0` in whole stretches of `W`; returns
/// where it stopped.
#[inline(always)]
fn sub_product_cols<const FMA: bool, const W: usize>(
    g: &[f32],
    w: f32,
    p: &[f32],
    out: &mut [f32],
    mut c0: usize,
) -> usize {
    let k = p.len();
    while c0 + W <= k {
        let mut acc = [0.0f32; W];
        for (r, pr) in p.iter().enumerate() {
            let row = &g[r * k + c0..r * k + c0 + W];
            for l in 0..W {
                acc[l] = madd::<FMA>(*pr, row[l], acc[l]);
            }
        }
        for (o, a) in out[c0..c0 + W].iter_mut().zip(&acc) {
            *o -= w * a;
        }
        c0 += W;
    }
    c0
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

dispatched! {
    /// `y += a · x` over `f64` slices (the shorter length if they differ).
    pub fn axpy_f64(a: f64, x: &[f64], y: &mut [f64]) = axpy_f64_impl;
}

#[inline(always)]
fn axpy_f64_impl<const FMA: bool>(a: f64, x: &[f64], y: &mut [f64]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi = if FMA {
            a.mul_add(*xi, *yi)
        } else {
            a * *xi + *yi
        };
    }
}

/// Inverts the symmetric positive-definite `n × n` matrix `a` (row-major, both
/// triangles) in place by Gauss–Jordan elimination without pivoting (safe for a
/// positive-definite matrix, whose pivots stay positive): `n³` multiply-adds, each row
/// update a contiguous axpy. Returns `false`, leaving `a` in an unspecified state, when
/// a pivot is not positive and finite (the matrix was not positive definite).
pub fn invert_spd(a: &mut [f64], n: usize) -> bool {
    if a.len() != n * n {
        return false;
    }
    let mut pivot_row = vec![0.0f64; n];
    for k in 0..n {
        let p = a[k * n + k];
        if !(p > 0.0 && p.is_finite()) {
            return false;
        }
        let inv = 1.0 / p;
        a[k * n + k] = 1.0;
        for (dst, src) in pivot_row.iter_mut().zip(&mut a[k * n..k * n + n]) {
            *src *= inv;
            *dst = *src;
        }
        for i in (0..n).filter(|&i| i != k) {
            let row = &mut a[i * n..i * n + n];
            let f = row[k];
            if f != 0.0 {
                row[k] = 0.0;
                axpy_f64(-f, &pivot_row, row);
            }
        }
    }
    true
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
        add_outer_lower(&mut m, 2, &[1.0, 2.0], &[2.0]);
        assert_eq!(m[0], 2.0);
        assert_eq!(m[2..], [4.0, 8.0]);
    }

    /// Both builds of each kernel (when this CPU runs the AVX2 one) against a naive
    /// computation, at sizes with and without a partial block.
    #[test]
    fn kernels_agree_with_naive_sums() {
        for k in [1usize, 3, 31, 32, 33, 64, 70] {
            let g0: Vec<f32> = (0..k * k)
                .map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1)
                .collect();
            // Symmetric: G = (M + Mᵀ) / 2.
            let g: Vec<f32> = (0..k * k)
                .map(|i| (g0[i] + g0[(i % k) * k + i / k]) / 2.0)
                .collect();
            let p: Vec<f32> = (0..k).map(|i| (i as f32 * 0.37).cos()).collect();
            let mut out = vec![1.0f32; k];
            sub_sym_product(&g, 0.5, &p, &mut out);
            let mut slow = vec![1.0f32; k];
            sub_sym_product_impl::<false>(&g, 0.5, &p, &mut slow);
            for r in 0..k {
                let naive: f32 = 1.0 - 0.5 * (0..k).map(|c| g[r * k + c] * p[c]).sum::<f32>();
                assert!(
                    (out[r] - naive).abs() < 1e-3,
                    "k {k} row {r}: {} vs {naive}",
                    out[r]
                );
                assert!(
                    (slow[r] - naive).abs() < 1e-3,
                    "k {k} row {r}: {} vs {naive}",
                    slow[r]
                );
            }
            let naive_dot: f32 = p.iter().zip(&g).map(|(x, y)| x * y).sum();
            assert!((dot(&p, &g[..k]) - naive_dot).abs() < 1e-3);
            // Eleven vectors: a whole block and a partial one.
            let vs: Vec<f32> = (0..11 * k)
                .map(|i| ((i * 5 % 17) as f32 - 8.0) * 0.05)
                .collect();
            let weights: Vec<f32> = (0..11).map(|b| 0.5 + b as f32).collect();
            let mut a = vec![0.0f32; k * k];
            add_outer_lower(&mut a, k, &vs, &weights);
            let mut slow = vec![0.0f32; k * k];
            add_outer_lower_impl::<false>(&mut slow, k, &vs, &weights);
            for r in 0..k {
                for c in 0..=r {
                    let want: f32 = (0..11)
                        .map(|b| weights[b] * vs[b * k + r] * vs[b * k + c])
                        .sum();
                    assert!((a[r * k + c] - want).abs() < 1e-4, "k {k} ({r}, {c})");
                    assert!((slow[r * k + c] - want).abs() < 1e-4, "k {k} ({r}, {c})");
                }
            }
        }
    }

    #[test]
    fn an_inverse_times_its_matrix_is_the_identity() {
        let n = 7;
        // A Gram matrix plus a ridge: symmetric positive definite.
        let m: Vec<f64> = (0..n * n)
            .map(|i| ((i * 37 % 11) as f64) / 5.0 - 1.0)
            .collect();
        let mut g = vec![0.0f64; n * n];
        for i in 0..n {
            for j in 0..n {
                g[i * n + j] = (0..n).map(|r| m[r * n + i] * m[r * n + j]).sum::<f64>();
            }
            g[i * n + i] += 0.5;
        }
        let mut inv = g.clone();
        assert!(invert_spd(&mut inv, n));
        for i in 0..n {
            for j in 0..n {
                let v: f64 = (0..n).map(|r| g[i * n + r] * inv[r * n + j]).sum();
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((v - want).abs() < 1e-9, "({i},{j}) = {v}");
            }
        }
        // Not positive definite: refused.
        let mut bad = vec![1.0, 2.0, 2.0, 1.0];
        assert!(!invert_spd(&mut bad, 2));
    }
}
