"""Tables and plots of finished runs: the study's CSV/Markdown tables and charts, and data stats' chart."""
