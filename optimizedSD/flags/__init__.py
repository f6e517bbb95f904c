"""Flag groups of the scripts, one module per concern: each adds its flags with the parser's ``add_argument``
and checks them (:mod:`optimizedSD.arguments` builds the parser from them). ``compvis`` translates CompVis'
spellings of the flags."""
