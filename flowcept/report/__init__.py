"""Reports: provenance card, PDF report, PROV-JSON export, live node view."""
