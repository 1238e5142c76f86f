"""Lightning callbacks: EMA, image sampling."""
