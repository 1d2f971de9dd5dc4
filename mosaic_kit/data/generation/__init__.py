"""SemAlign-MS-style data building (paper §3): prompts → images → subjects → filter → references → correspondences."""
from .build import *  # noqa: F401,F403
from .config import *  # noqa: F401,F403
from .correspondences import *  # noqa: F401,F403
from .filtering import *  # noqa: F401,F403
from .images import *  # noqa: F401,F403
from .prompts import *  # noqa: F401,F403
from .records import *  # noqa: F401,F403
from .references import *  # noqa: F401,F403
from .subjects import *  # noqa: F401,F403
