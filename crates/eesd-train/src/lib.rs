//! The EESD trainer: teacher data from the frozen base (`teacher`), self-distillation of the
//! early-exit head (`distill`), recipes that run both (`recipe`), and the optimiser whose state
//! we own (`adamw`).
pub mod adamw;
pub mod distill;
pub mod recipe;
pub mod teacher;
