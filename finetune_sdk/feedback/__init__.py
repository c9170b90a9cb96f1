"""Human feedback: rating sessions in the terminal, rating rows, the ratings files, model output shown safely."""
