"""Job and workflow templates (installed as ``cdae_em.templates``): RELION External job.star files
and Scipion ``*.json.template`` workflows."""
