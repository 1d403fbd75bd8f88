"""Feedback: the content store (generations, ratings, comparisons, jobs) and the output folder."""
