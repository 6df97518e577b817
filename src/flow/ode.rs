//! ODE solvers with torchdiffeq's semantics, which SiT's `sample_ode` calls: fixed-grid "euler"
//! and "heun2" on a float32 grid, and adaptive "dopri5" (Dormand–Prince 5(4) with torchdiffeq's
//! step-size control, initial step and 4th-order dense output), so a run can be compared with
//! upstream at tolerance level. The state is a tensor; times are f32 where torchdiffeq uses f32
//! (the times the field sees) and f64 where it uses f64 (step sizes, error ratios).

use candle::{DType, Tensor};

/// dx/dt = f(x, t): what the solvers integrate.
pub type Field<'a> = dyn FnMut(&Tensor, f32) -> anyhow::Result<Tensor> + 'a;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OdeMethod {
    Euler,
    /// Heun's 2nd-order method (torchdiffeq "heun2").
    Heun,
    /// Adaptive Dormand–Prince 5(4), SiT's default.
    #[default]
    Dopri5,
}

impl std::str::FromStr for OdeMethod {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "euler" => Ok(Self::Euler),
            "heun" | "heun2" => Ok(Self::Heun),
            "dopri5" => Ok(Self::Dopri5),
            _ => anyhow::bail!("unknown ODE method '{s}': expected euler, heun or dopri5"),
        }
    }
}

impl std::fmt::Display for OdeMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Euler => "euler",
            Self::Heun => "heun",
            Self::Dopri5 => "dopri5",
        })
    }
}

/// `torch.linspace(t0, t1, n)` in float32, with torch's CPU formula (the first half counted from
/// t0, the second from t1), so the grid matches upstream's bit for bit on short grids and to an
/// ulp on long ones.
pub fn linspace(t0: f64, t1: f64, n: usize) -> Vec<f32> {
    let (a, b) = (t0 as f32, t1 as f32);
    if n == 1 {
        return vec![a];
    }
    let step = (b - a) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                a + step * i as f32
            } else {
                b - step * (n - i - 1) as f32
            }
        })
        .collect()
}

/// The result of one solve.
#[derive(Debug)]
pub struct OdeSolution {
    /// The state at every grid time, the initial state first.
    pub states: Vec<Tensor>,
    /// Field evaluations.
    pub calls: usize,
    /// Adaptive solvers: accepted and rejected steps.
    pub accepted: usize,
    pub rejected: usize,
}

/// Error control of the adaptive solver.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Tolerances {
    pub atol: f64,
    pub rtol: f64,
    /// Accepted + rejected steps before giving up (torchdiffeq has no practical limit; a
    /// runaway solve here fails with a clear error instead).
    #[serde(skip)]
    pub max_steps: usize,
}

impl Default for Tolerances {
    fn default() -> Self {
        Self {
            atol: 1e-6,
            rtol: 1e-3,
            max_steps: 10_000,
        }
    }
}

/// Solves from `grid[0]` through every time of the strictly increasing `grid`.
pub fn solve(
    method: OdeMethod,
    f: &mut Field,
    x0: Tensor,
    grid: &[f32],
    tol: Tolerances,
) -> anyhow::Result<OdeSolution> {
    anyhow::ensure!(!grid.is_empty(), "the ODE time grid is empty");
    anyhow::ensure!(
        grid.windows(2).all(|w| w[1] > w[0]),
        "the ODE time grid must be strictly increasing"
    );
    match method {
        OdeMethod::Euler | OdeMethod::Heun => fixed_grid(method, f, x0, grid),
        OdeMethod::Dopri5 => dopri5(f, x0, grid, tol),
    }
}

/// Every time the field is evaluated at on a fixed grid, in call order (what a DySiT's mask
/// table is precomputed for). `None` for the adaptive solver, whose times are not known ahead.
pub fn fixed_grid_times(method: OdeMethod, grid: &[f32]) -> Option<Vec<f32>> {
    let steps = grid.windows(2);
    match method {
        OdeMethod::Euler => Some(steps.map(|w| w[0]).collect()),
        OdeMethod::Heun => Some(
            steps
                .flat_map(|w| {
                    let dt = w[1] - w[0];
                    [w[0], w[0] + dt]
                })
                .collect(),
        ),
        OdeMethod::Dopri5 => None,
    }
}

/// torchdiffeq's `FixedGridODESolver.integrate` on the grid itself (no sub-steps).
fn fixed_grid(
    method: OdeMethod,
    f: &mut Field,
    x0: Tensor,
    grid: &[f32],
) -> anyhow::Result<OdeSolution> {
    let mut states = vec![x0];
    let mut calls = 0;
    for w in grid.windows(2) {
        let (t0, t1) = (w[0], w[1]);
        let dt = t1 - t0;
        let y0 = states.last().expect("initial state");
        let k1 = f(y0, t0)?;
        calls += 1;
        let dy = match method {
            OdeMethod::Euler => (&k1 * dt as f64)?,
            _ => {
                // heun2: k2 at t0 + dt (in f32, as torchdiffeq computes it), then the mean slope.
                let y1 = (y0 + (&k1 * dt as f64)?)?;
                let k2 = f(&y1, t0 + dt)?;
                calls += 1;
                (((&k1 * 0.5)? + (&k2 * 0.5)?)? * dt as f64)?
            }
        };
        let y1 = (y0 + dy)?;
        states.push(y1);
    }
    Ok(OdeSolution {
        states,
        calls,
        accepted: grid.len().saturating_sub(1),
        rejected: 0,
    })
}

/// Dormand–Prince 5(4) with Shampine's dense output (torchdiffeq's tableau).
mod dp {
    pub const ALPHA: [f64; 6] = [1.0 / 5.0, 3.0 / 10.0, 4.0 / 5.0, 8.0 / 9.0, 1.0, 1.0];
    pub const BETA: [&[f64]; 6] = [
        &[1.0 / 5.0],
        &[3.0 / 40.0, 9.0 / 40.0],
        &[44.0 / 45.0, -56.0 / 15.0, 32.0 / 9.0],
        &[
            19372.0 / 6561.0,
            -25360.0 / 2187.0,
            64448.0 / 6561.0,
            -212.0 / 729.0,
        ],
        &[
            9017.0 / 3168.0,
            -355.0 / 33.0,
            46732.0 / 5247.0,
            49.0 / 176.0,
            -5103.0 / 18656.0,
        ],
        &[
            35.0 / 384.0,
            0.0,
            500.0 / 1113.0,
            125.0 / 192.0,
            -2187.0 / 6784.0,
            11.0 / 84.0,
        ],
    ];
    pub const C_ERROR: [f64; 7] = [
        35.0 / 384.0 - 1951.0 / 21600.0,
        0.0,
        500.0 / 1113.0 - 22642.0 / 50085.0,
        125.0 / 192.0 - 451.0 / 720.0,
        -2187.0 / 6784.0 - -12231.0 / 42400.0,
        11.0 / 84.0 - 649.0 / 6300.0,
        -1.0 / 60.0,
    ];
    pub const C_MID: [f64; 7] = [
        6025192743.0 / 30085553152.0 / 2.0,
        0.0,
        51252292925.0 / 65400821598.0 / 2.0,
        -2691868925.0 / 45128329728.0 / 2.0,
        187940372067.0 / 1594534317056.0 / 2.0,
        -1776094331.0 / 19743644256.0 / 2.0,
        11237099.0 / 235043384.0 / 2.0,
    ];
    /// Order of the error estimate's step-size law.
    pub const ORDER: f64 = 5.0;
    pub const SAFETY: f64 = 0.9;
    pub const IFACTOR: f64 = 10.0;
    pub const DFACTOR: f64 = 0.2;
}

/// The largest f32 below `t` (torchdiffeq evaluates stages that end a step "just before" t1).
fn f32_prev(t: f32) -> f32 {
    if t.is_nan() || t == f32::NEG_INFINITY {
        t
    } else if t == 0.0 {
        -f32::from_bits(1)
    } else if t > 0.0 {
        f32::from_bits(t.to_bits() - 1)
    } else {
        f32::from_bits(t.to_bits() + 1)
    }
}

/// y0 + Σ_j k_j·(c_j·dt), with each coefficient rounded to f32 as torchdiffeq forms it.
fn combine(y0: &Tensor, k: &[Tensor], c: &[f64], dt: f32) -> candle::Result<Tensor> {
    let mut acc: Option<Tensor> = None;
    for (kj, &cj) in k.iter().zip(c) {
        let term = kj.affine(((cj as f32) * dt) as f64, 0.0)?;
        acc = Some(match acc {
            None => term,
            Some(a) => (a + term)?,
        });
    }
    match acc {
        Some(a) => y0 + a,
        None => Ok(y0.clone()),
    }
}

/// Root mean square over every element, in f64.
fn rms(t: &Tensor) -> candle::Result<f64> {
    t.to_dtype(DType::F64)?
        .sqr()?
        .mean_all()?
        .sqrt()?
        .to_scalar::<f64>()
}

fn all_finite(t: &Tensor) -> candle::Result<bool> {
    // An f64 sum of f32 values cannot overflow: it is finite iff every entry is.
    Ok(t.to_dtype(DType::F64)?
        .sum_all()?
        .to_scalar::<f64>()?
        .is_finite())
}

/// torchdiffeq's `_select_initial_step` (Hairer, Nørsett & Wanner II.4) with its f32/f64 mix.
fn initial_step(
    f: &mut Field,
    t0: f64,
    y0: &Tensor,
    f0: &Tensor,
    tol: &Tolerances,
    calls: &mut usize,
) -> anyhow::Result<f64> {
    let scale = y0.abs()?.to_dtype(DType::F64)?.affine(tol.rtol, tol.atol)?;
    let scaled = |v: &Tensor| -> candle::Result<f64> { rms(&v.to_dtype(DType::F64)?.div(&scale)?) };
    let d0 = scaled(y0)?;
    let d1 = scaled(f0)?;
    let h0 = if d0 < 1e-5 || d1 < 1e-5 {
        1e-6f32 as f64
    } else {
        0.01 * d0 / d1
    };
    let y1 = (y0 + f0.affine(h0, 0.0)?)?;
    let f1 = f(&y1, (t0 + h0) as f32)?;
    *calls += 1;
    let d2 = scaled(&(f1 - f0)?)? / h0;
    let h1 = if d1 <= 1e-15 && d2 <= 1e-15 {
        (1e-6f32 as f64).max(h0 * 1e-3)
    } else {
        (0.01 / d1.max(d2)).powf(1.0 / dp::ORDER)
    };
    Ok((100.0 * h0).min(h1))
}

/// The accepted step's dense-output polynomial in x = (t − t0)/(t1 − t0): [e, d, c, b, a].
fn interp_fit(y0: &Tensor, y1: &Tensor, k: &[Tensor], dt: f32) -> candle::Result<[Tensor; 5]> {
    let dt64 = dt as f64;
    let y_mid = combine(y0, k, &dp::C_MID, dt)?;
    let (f0, f1) = (&k[0], &k[6]);
    let a = ((((f1 - f0)? * (2.0 * dt64))? - ((y1 + y0)? * 8.0)?)? + (&y_mid * 16.0)?)?;
    let b = ((((((f0 * 5.0)? - (f1 * 3.0)?)? * dt64)? + (y0 * 18.0)?)? + (y1 * 14.0)?)?
        - (&y_mid * 32.0)?)?;
    let c =
        ((((((f1 - (f0 * 4.0)?)? * dt64)? - (y0 * 11.0)?)? - (y1 * 5.0)?)?) + (&y_mid * 16.0)?)?;
    let d = (f0 * dt64)?;
    Ok([y0.clone(), d, c, b, a])
}

fn interp_eval(coef: &[Tensor; 5], t0: f64, t1: f64, t: f64) -> candle::Result<Tensor> {
    let x = ((t - t0) / (t1 - t0)) as f32;
    let mut total = (&coef[0] + (&coef[1] * x as f64)?)?;
    let mut xp = x;
    for c in &coef[2..] {
        xp *= x;
        total = (total + (c * xp as f64)?)?;
    }
    Ok(total)
}

/// Adaptive Dormand–Prince as torchdiffeq's `RKAdaptiveStepsizeODESolver`: steps are never cut
/// to land on the output times; each output is interpolated inside the step that covers it.
fn dopri5(f: &mut Field, x0: Tensor, grid: &[f32], tol: Tolerances) -> anyhow::Result<OdeSolution> {
    anyhow::ensure!(
        tol.atol > 0.0 && tol.rtol > 0.0 && tol.atol.is_finite() && tol.rtol.is_finite(),
        "dopri5 needs atol > 0 and rtol > 0 (got {} and {})",
        tol.atol,
        tol.rtol
    );
    let mut calls = 0;
    let t_start = grid[0] as f64;
    let mut y = x0.clone();
    let mut fy = f(&y, t_start as f32)?;
    calls += 1;
    let mut dt = initial_step(f, t_start, &y, &fy, &tol, &mut calls)?;
    // The last accepted step [t_lo, t_hi] and its interpolant.
    let (mut t_lo, mut t_hi) = (t_start, t_start);
    let mut coef: Option<[Tensor; 5]> = None;
    let (mut accepted, mut rejected) = (0usize, 0usize);
    let mut states = vec![x0];
    for &t_out in &grid[1..] {
        let t_out = t_out as f64;
        while t_out > t_hi {
            anyhow::ensure!(
                accepted + rejected < tol.max_steps,
                "dopri5 took more than {} steps before t = {t_out}: loosen --rtol/--atol or use a \
                 fixed-step method",
                tol.max_steps
            );
            anyhow::ensure!(
                dt.is_finite() && t_hi + dt > t_hi,
                "dopri5 step size underflow at t = {t_hi} (dt = {dt:e})"
            );
            let t0 = t_hi;
            let t1 = t0 + dt;
            let (t0f, dtf, t1f) = (t0 as f32, dt as f32, t1 as f32);
            let mut k = vec![fy.clone()];
            let mut yi = y.clone();
            for (i, (&alpha, beta)) in dp::ALPHA.iter().zip(dp::BETA).enumerate() {
                let ti = if alpha == 1.0 {
                    f32_prev(t1f)
                } else {
                    t0f + alpha as f32 * dtf
                };
                yi = combine(&y, &k[..=i], beta, dtf)?;
                k.push(f(&yi, ti)?);
                calls += 1;
            }
            let y1 = yi;
            let err = combine(&y.zeros_like()?, &k, &dp::C_ERROR, dtf)?;
            let err_tol = y
                .abs()?
                .maximum(&y1.abs()?)?
                .to_dtype(DType::F64)?
                .affine(tol.rtol, tol.atol)?;
            let ratio = rms(&err.to_dtype(DType::F64)?.div(&err_tol)?)?;
            anyhow::ensure!(
                all_finite(&y1)?,
                "dopri5: the state became non-finite at t = {t1}"
            );
            if ratio <= 1.0 {
                coef = Some(interp_fit(&y, &y1, &k, dtf)?);
                t_lo = t0;
                t_hi = t1;
                y = y1;
                fy = k.pop().expect("7 stages");
                accepted += 1;
            } else {
                rejected += 1;
            }
            dt *= if ratio == 0.0 {
                dp::IFACTOR
            } else {
                let dfactor = if ratio < 1.0 { 1.0 } else { dp::DFACTOR };
                dp::IFACTOR.min((dp::SAFETY / ratio.powf(1.0 / dp::ORDER)).max(dfactor))
            };
        }
        let c = coef.as_ref().expect("at least one accepted step");
        states.push(interp_eval(c, t_lo, t_hi, t_out)?);
    }
    Ok(OdeSolution {
        states,
        calls,
        accepted,
        rejected,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::Device;

    fn scalar(v: f32) -> Tensor {
        Tensor::new(&[v], &Device::Cpu).unwrap()
    }

    fn value(t: &Tensor) -> f64 {
        t.to_vec1::<f32>().unwrap()[0] as f64
    }

    #[test]
    fn linspace_like_torch() {
        assert_eq!(linspace(0.0, 1.0, 5), vec![0.0, 0.25, 0.5, 0.75, 1.0]);
        let g = linspace(0.0, 0.96, 8);
        assert_eq!((g[0], g[7]), (0.0, 0.96f32));
        assert_eq!(linspace(0.0, 1.0, 1), vec![0.0]);
    }

    #[test]
    fn euler_and_heun_orders() {
        // dx/dt = x on [0, 1]: Euler's error shrinks ~linearly, Heun's ~quadratically.
        let err = |m: OdeMethod, n: usize| {
            let mut f = |x: &Tensor, _t: f32| Ok(x.clone());
            let s = solve(
                m,
                &mut f,
                scalar(1.0),
                &linspace(0.0, 1.0, n + 1),
                Default::default(),
            )
            .unwrap();
            assert_eq!(s.calls, if m == OdeMethod::Euler { n } else { 2 * n });
            (value(s.states.last().unwrap()) - std::f64::consts::E).abs()
        };
        let (e1, e2) = (err(OdeMethod::Euler, 20), err(OdeMethod::Euler, 40));
        assert!((e1 / e2 - 2.0).abs() < 0.2, "{e1} {e2}");
        let (h1, h2) = (err(OdeMethod::Heun, 20), err(OdeMethod::Heun, 40));
        assert!((h1 / h2 - 4.0).abs() < 0.5, "{h1} {h2}");
    }

    #[test]
    fn dopri5_meets_its_tolerance_and_adapts() {
        // x' = cos(t)·x, x(0) = 1 → x = exp(sin t).
        let run = |rtol: f64| {
            let mut f = |x: &Tensor, t: f32| Ok((x * (t as f64).cos())?);
            let grid = linspace(0.0, 4.0, 9);
            let tol = Tolerances {
                atol: 1e-9,
                rtol,
                ..Default::default()
            };
            let s = solve(OdeMethod::Dopri5, &mut f, scalar(1.0), &grid, tol).unwrap();
            let worst = s
                .states
                .iter()
                .zip(&grid)
                .map(|(x, &t)| (value(x) - (t as f64).sin().exp()).abs())
                .fold(0.0, f64::max);
            (worst, s)
        };
        let (loose_err, loose) = run(1e-3);
        let (tight_err, tight) = run(1e-6);
        assert!(loose_err < 2e-2, "{loose_err}");
        assert!(tight_err < 1e-4, "{tight_err}");
        assert!(
            tight.accepted > 2 * loose.accepted,
            "{tight:?} vs {loose:?}"
        );
        assert_eq!(tight.calls, 2 + 6 * (tight.accepted + tight.rejected));
    }

    #[test]
    fn dopri5_output_grid_does_not_change_the_steps() {
        let run = |n: usize| {
            let mut f = |x: &Tensor, t: f32| Ok((x * (-(t as f64)))?);
            solve(
                OdeMethod::Dopri5,
                &mut f,
                scalar(1.0),
                &linspace(0.0, 2.0, n),
                Default::default(),
            )
            .unwrap()
        };
        let (a, b) = (run(2), run(50));
        assert_eq!((a.accepted, a.rejected), (b.accepted, b.rejected));
        let (xa, xb) = (
            value(a.states.last().unwrap()),
            value(b.states.last().unwrap()),
        );
        assert!((xa - xb).abs() < 1e-7);
        assert!((xa - (-2.0f64).exp()).abs() < 1e-4);
    }

    #[test]
    fn dopri5_fails_cleanly() {
        let mut blow_up = |x: &Tensor, _t: f32| Ok((x.sqr()? * 1e6)?);
        let tol = Tolerances {
            max_steps: 50,
            ..Default::default()
        };
        let e = solve(
            OdeMethod::Dopri5,
            &mut blow_up,
            scalar(1.0),
            &[0.0, 1.0],
            tol,
        )
        .unwrap_err();
        assert!(format!("{e}").contains("dopri5"), "{e}");
    }

    #[test]
    fn prev_float() {
        assert!(f32_prev(1.0) < 1.0 && f32_prev(1.0) > 0.9999);
        assert!(f32_prev(0.0) < 0.0);
    }
}
