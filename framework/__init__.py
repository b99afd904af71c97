"""hyperkrylov framework: Krylov solvers, recycling, and the bilevel engine."""
