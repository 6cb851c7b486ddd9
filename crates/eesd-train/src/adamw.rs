//! AdamW with its moments owned here, so they can be saved and restored (tch's optimisers
//! cannot save their state, and a resume without moments is not the same run).

use tch::Tensor;

pub struct AdamW {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Updates taken (for bias correction).
    pub t: u64,
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
}

impl AdamW {
    pub fn new(params: &[&mut Tensor], lr: f64, weight_decay: f64) -> Self {
        AdamW {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            t: 0,
            m: params.iter().map(|p| p.zeros_like().detach()).collect(),
            v: params.iter().map(|p| p.zeros_like().detach()).collect(),
        }
    }

    /// One update of every parameter from its `.grad()`, at learning rate `lr`; grads are
    /// zeroed afterwards. Decoupled weight decay applies to matrices only (not norm gains).
    pub fn step(&mut self, params: &mut [&mut Tensor], lr: f64) {
        let _g = tch::no_grad_guard();
        self.t += 1;
        let bc1 = 1.0 - self.beta1.powi(self.t as i32);
        let bc2 = 1.0 - self.beta2.powi(self.t as i32);
        for (i, p) in params.iter_mut().enumerate() {
            let g = p.grad();
            if !g.defined() {
                continue;
            }
            let _ = self.m[i]
                .g_mul_scalar_(self.beta1)
                .g_add_(&(&g * (1.0 - self.beta1)));
            let _ = self.v[i]
                .g_mul_scalar_(self.beta2)
                .g_add_(&(g.square() * (1.0 - self.beta2)));
            if self.weight_decay > 0.0 && p.dim() > 1 {
                let _ = p.g_mul_scalar_(1.0 - lr * self.weight_decay);
            }
            let update = (&self.m[i] / bc1) / ((&self.v[i] / bc2).sqrt() + self.eps) * lr;
            let _ = p.g_sub_(&update);
            let mut g = p.grad();
            let _ = g.zero_();
        }
    }
}

/// Scales all gradients so their global L2 norm is at most `max_norm`; returns the norm before.
pub fn clip_grad_norm(params: &[&mut Tensor], max_norm: f64) -> f64 {
    let _g = tch::no_grad_guard();
    let sq: f64 = params
        .iter()
        .map(|p| p.grad())
        .filter(|g| g.defined())
        .map(|g| g.square().sum(tch::Kind::Double).double_value(&[]))
        .sum();
    let norm = sq.sqrt();
    if norm > max_norm && norm.is_finite() {
        for p in params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.g_mul_scalar_(max_norm / (norm + 1e-6));
            }
        }
    }
    norm
}

/// Linear warmup to `peak` over `warmup` steps, then cosine decay to 10% of peak at `total`.
pub fn lr_at(step: u64, peak: f64, warmup: u64, total: u64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
    let cos = 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos());
    peak * (0.1 + 0.9 * cos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_shape() {
        assert!((lr_at(0, 1.0, 10, 100) - 0.1).abs() < 1e-12);
        assert!((lr_at(9, 1.0, 10, 100) - 1.0).abs() < 1e-12);
        assert!((lr_at(100, 1.0, 10, 100) - 0.1).abs() < 1e-12);
        assert!(lr_at(50, 1.0, 10, 100) < 1.0 && lr_at(50, 1.0, 10, 100) > 0.1);
    }

    #[test]
    fn adamw_minimises_a_quadratic() {
        let mut x = Tensor::from_slice(&[3.0f32, -2.0]).set_requires_grad(true);
        let mut opt = AdamW::new(&[&mut x], 0.1, 0.0);
        for _ in 0..300 {
            let loss = x.square().sum(tch::Kind::Float);
            loss.backward();
            opt.step(&mut [&mut x], 0.1);
        }
        assert!(x.abs().max().double_value(&[]) < 0.05, "{x}");
    }
}
