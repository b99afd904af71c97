"""The bilevel engine: lower-level solves, hypergradients and their recycled Krylov systems."""
