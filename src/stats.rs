//! The statistics every report and study uses: intervals, tests, correlations and the
//! small distribution maths of logits. Pure functions, no I/O; seeded where random.

use crate::rng::Rng;

/// z for a 95% interval.
const Z95: f64 = 1.959_963_984_540_054;

/// Bootstrap resamples for the mean score's interval.
pub const BOOTSTRAP: usize = 2000;

/// Wilson score interval for k successes in n trials (95%).
pub fn wilson(k: usize, n: usize) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let (k, n) = (k as f64, n as f64);
    let p = k / n;
    let z2 = Z95 * Z95;
    let d = 1.0 + z2 / n;
    let c = (p + z2 / (2.0 * n)) / d;
    let h = Z95 / d * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    ((c - h).max(0.0), (c + h).min(1.0))
}

/// Percentile bootstrap interval (95%) of the mean, seeded.
pub fn bootstrap_mean(v: &[f64], seed: u64) -> (f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mut rng = Rng::new(seed);
    let n = v.len();
    let mut means: Vec<f64> = (0..BOOTSTRAP)
        .map(|_| (0..n).map(|_| v[rng.below(n as u64) as usize]).sum::<f64>() / n as f64)
        .collect();
    means.sort_by(f64::total_cmp);
    let q = |p: f64| means[((p * (BOOTSTRAP - 1) as f64).round() as usize).min(BOOTSTRAP - 1)];
    (q(0.025), q(0.975))
}

/// The 95% interval of a rate over clusters of trials that are not independent (several
/// sampled completions of one prompt): `clusters[i]` = (successes, trials) of cluster i.
/// One trial per cluster gives the Wilson interval; otherwise a seeded percentile bootstrap
/// over clusters (prompts drawn with replacement, the rate of all their trials), so the
/// interval widens by as much as samples of one prompt agree with each other.
pub fn clustered_rate_interval(clusters: &[(usize, usize)], seed: u64) -> (f64, f64) {
    let (k, n) = clusters
        .iter()
        .fold((0, 0), |(k, n), &(a, b)| (k + a, n + b));
    if clusters.iter().all(|&(_, t)| t <= 1) {
        return wilson(k, n);
    }
    let m = clusters.len();
    let mut rng = Rng::new(seed);
    let mut rates: Vec<f64> = (0..BOOTSTRAP)
        .map(|_| {
            let (mut a, mut b) = (0usize, 0usize);
            for _ in 0..m {
                let (x, y) = clusters[rng.below(m as u64) as usize];
                a += x;
                b += y;
            }
            a as f64 / b.max(1) as f64
        })
        .collect();
    rates.sort_by(f64::total_cmp);
    let q = |p: f64| rates[((p * (BOOTSTRAP - 1) as f64).round() as usize).min(BOOTSTRAP - 1)];
    (q(0.025), q(0.975))
}

/// Two-sided p-value of the pooled two-proportion z-test (1 when undefined).
pub fn two_proportion_p(k1: usize, n1: usize, k2: usize, n2: usize) -> f64 {
    if n1 == 0 || n2 == 0 {
        return 1.0;
    }
    let (p1, p2) = (k1 as f64 / n1 as f64, k2 as f64 / n2 as f64);
    let p = (k1 + k2) as f64 / (n1 + n2) as f64;
    let se = (p * (1.0 - p) * (1.0 / n1 as f64 + 1.0 / n2 as f64)).sqrt();
    if se == 0.0 {
        return 1.0;
    }
    let z = ((p1 - p2) / se).abs();
    erfc(z / std::f64::consts::SQRT_2)
}

/// Complementary error function (Numerical Recipes' erfcc, |error| < 1.2e-7).
pub fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t
        * (-z * z - 1.265_512_23
            + t * (1.000_023_68
                + t * (0.374_091_96
                    + t * (0.096_784_18
                        + t * (-0.186_288_06
                            + t * (0.278_868_07
                                + t * (-1.135_203_98
                                    + t * (1.488_515_87
                                        + t * (-0.822_152_23 + t * 0.170_872_77)))))))))
            .exp();
    if x >= 0.0 {
        r
    } else {
        2.0 - r
    }
}

/// Average ranks (ties share the mean rank), 1-based.
fn ranks(v: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    let mut r = vec![0.0; v.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && v[idx[j + 1]] == v[idx[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        for &k in &idx[i..=j] {
            r[k] = avg;
        }
        i = j + 1;
    }
    r
}

/// Pearson correlation; NaN when either side is constant.
pub fn pearson(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let cov: f64 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = a.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = b.iter().map(|y| (y - mb).powi(2)).sum();
    cov / (va * vb).sqrt()
}

/// Spearman rank correlation (Pearson on average ranks).
pub fn spearman(a: &[f64], b: &[f64]) -> f64 {
    pearson(&ranks(a), &ranks(b))
}

/// The arithmetic mean; 0 for an empty slice.
pub fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// The first index of the largest value: the greedy choice. Comparisons with NaN are false,
/// so a NaN is never chosen over an earlier number.
pub fn argmax<T: PartialOrd>(x: &[T]) -> usize {
    let mut best = 0;
    for (i, v) in x.iter().enumerate() {
        if *v > x[best] {
            best = i;
        }
    }
    best
}

/// Softmax of finite values, computed from the maximum so large logits do not overflow.
pub fn softmax(l: &[f64]) -> Vec<f64> {
    let m = l.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = l.iter().map(|x| (x - m).exp()).collect();
    let z: f64 = e.iter().sum();
    e.into_iter().map(|x| x / z).collect()
}

/// log softmax of logits, in f64 (log-sum-exp from the maximum).
pub fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let m = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let lse = m + logits
        .iter()
        .map(|&x| (x as f64 - m).exp())
        .sum::<f64>()
        .ln();
    logits.iter().map(|&x| x as f64 - lse).collect()
}

/// KL(p ‖ q) of two next-token distributions given as logits, in nats.
pub fn kl(p_logits: &[f32], q_logits: &[f32]) -> f64 {
    let (lp, lq) = (log_softmax(p_logits), log_softmax(q_logits));
    lp.iter()
        .zip(&lq)
        .map(|(a, b)| a.exp() * (a - b))
        .sum::<f64>()
        .max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clustered_intervals_widen_when_samples_of_a_prompt_agree() {
        // One trial per prompt: Wilson exactly.
        let single: Vec<(usize, usize)> = (0..20).map(|i| (usize::from(i < 8), 1)).collect();
        assert_eq!(clustered_rate_interval(&single, 1), wilson(8, 20));
        // 20 prompts x 5 samples, 40% refusals: when each prompt's samples all agree the
        // interval is about as wide as 20 independent trials, far wider than Wilson over 100;
        // when every prompt refuses 2 of 5 the prompts carry no spread and it is narrow.
        let agree: Vec<(usize, usize)> = (0..20).map(|i| (if i < 8 { 5 } else { 0 }, 5)).collect();
        let mixed: Vec<(usize, usize)> = (0..20).map(|_| (2, 5)).collect();
        let w = |(lo, hi): (f64, f64)| hi - lo;
        let (a, m, naive) = (
            clustered_rate_interval(&agree, 3),
            clustered_rate_interval(&mixed, 3),
            wilson(40, 100),
        );
        assert!(w(a) > 1.5 * w(naive), "{a:?} vs {naive:?}");
        assert!(w(m) < 1e-9, "{m:?}");
        assert!(a.0 <= 0.4 && 0.4 <= a.1);
        assert_eq!(clustered_rate_interval(&agree, 3), a, "seeded");
    }

    #[test]
    fn wilson_matches_known_values() {
        // 0/10: upper bound 0.2775 (standard table value).
        let (lo, hi) = wilson(0, 10);
        assert_eq!(lo, 0.0);
        assert!((hi - 0.2775).abs() < 1e-4, "{hi}");
        let (lo, hi) = wilson(5, 10);
        assert!(
            (lo - 0.2366).abs() < 1e-4 && (hi - 0.7634).abs() < 1e-4,
            "{lo} {hi}"
        );
    }

    #[test]
    fn spearman_uses_average_ranks() {
        assert!((spearman(&[1.0, 2.0, 3.0], &[10.0, 20.0, 30.0]) - 1.0).abs() < 1e-12);
        assert!((spearman(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]) + 1.0).abs() < 1e-12);
        assert_eq!(ranks(&[5.0, 1.0, 5.0]), vec![2.5, 1.0, 2.5]);
        assert!(spearman(&[1.0, 1.0, 1.0], &[1.0, 2.0, 3.0]).is_nan());
    }

    #[test]
    fn bootstrap_is_seeded_and_brackets_the_mean() {
        let v: Vec<f64> = (0..30).map(|i| i as f64).collect();
        let a = bootstrap_mean(&v, 7);
        assert_eq!(a, bootstrap_mean(&v, 7));
        assert!(a.0 < 14.5 && 14.5 < a.1);
        assert_eq!(bootstrap_mean(&[2.0; 5], 1), (2.0, 2.0));
    }

    #[test]
    fn two_proportion_test_matches_known_values() {
        // 50/100 vs 50/100: identical, p = 1.
        assert!((two_proportion_p(50, 100, 50, 100) - 1.0).abs() < 1e-6);
        // 60/100 vs 40/100: z = 2.828, p = 0.00468.
        assert!((two_proportion_p(60, 100, 40, 100) - 0.004678).abs() < 1e-4);
        assert_eq!(two_proportion_p(0, 10, 0, 10), 1.0);
        assert!((erfc(0.0) - 1.0).abs() < 1e-7 && (erfc(1.0) - 0.157_299_2).abs() < 1e-6);
    }

    #[test]
    fn kl_is_zero_for_equal_and_positive_otherwise() {
        assert!(kl(&[1.0, 2.0, 3.0], &[1.0, 2.0, 3.0]).abs() < 1e-12);
        assert!(kl(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]) > 0.5);
        // Shifting all logits changes nothing.
        assert!(kl(&[1.0, 2.0], &[11.0, 12.0]).abs() < 1e-9);
    }

    #[test]
    fn argmax_takes_the_first_largest_and_softmax_sums_to_one() {
        assert_eq!(argmax(&[1.0f32, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[1.0f32, f32::NAN, 3.0]), 2);
        assert_eq!(argmax(&[2.0f64, f64::NAN, 1.0]), 0);
        let p = softmax(&[1000.0, 1000.0, 0.0]);
        assert!((p[0] - 0.5).abs() < 1e-12 && p[2] < 1e-300);
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert_eq!(mean(&[]), 0.0);
        assert_eq!(mean(&[1.0, 2.0, 6.0]), 3.0);
    }
}
