"""The API key comes from Secrets Manager or SSM (moto), never from the image."""
from __future__ import annotations

import boto3
import pytest
from moto import mock_aws

from service.aws.secrets import resolve_secret_env
from service.config import Settings
from tests.aws_support import use_fake_aws_credentials


@pytest.fixture
def aws_accounts():
    use_fake_aws_credentials()
    with mock_aws():
        yield boto3.client("secretsmanager", region_name="us-east-1"), boto3.client("ssm", region_name="us-east-1")


def test_secrets_manager_plain_string(aws_accounts):
    sm, _ = aws_accounts
    arn = sm.create_secret(Name="acestep/api-key", SecretString="  s3cret \n")["ARN"]
    settings = resolve_secret_env(Settings(aws_region="us-east-1"), {"ACESTEP_API_KEY_SECRET_ARN": arn})
    assert settings.api_key == "s3cret"


def test_secrets_manager_json_and_precedence_over_ssm(aws_accounts):
    sm, ssm = aws_accounts
    arn = sm.create_secret(Name="acestep/api-key", SecretString='{"api_key": "from-json"}')["ARN"]
    ssm.put_parameter(Name="/acestep/api-key", Value="from-ssm", Type="SecureString")
    env = {"ACESTEP_API_KEY_SECRET_ARN": arn, "ACESTEP_API_KEY_SSM_PARAM": "/acestep/api-key"}
    assert resolve_secret_env(Settings(aws_region="us-east-1"), env).api_key == "from-json"


def test_ssm_secure_string(aws_accounts):
    _, ssm = aws_accounts
    ssm.put_parameter(Name="/acestep/api-key", Value="from-ssm", Type="SecureString")
    env = {"ACESTEP_API_KEY_SSM_PARAM": "/acestep/api-key"}
    assert resolve_secret_env(Settings(aws_region="us-east-1", api_key="old"), env).api_key == "from-ssm"


def test_nothing_set_leaves_the_key_alone(aws_accounts):
    assert resolve_secret_env(Settings(api_key="from-env"), {}).api_key == "from-env"


def test_missing_secret_is_an_error_not_an_open_api(aws_accounts):
    with pytest.raises(Exception):
        resolve_secret_env(Settings(aws_region="us-east-1"), {"ACESTEP_API_KEY_SSM_PARAM": "/nope"})


def test_hub_token_from_secrets_manager_reaches_huggingface_hub(aws_accounts):
    from service.aws.secrets import resolve_hub_token

    sm, _ = aws_accounts
    plain = sm.create_secret(Name="acestep/hf", SecretString="hf_abc\n")["ARN"]
    env: dict = {"ACESTEP_HF_TOKEN_SECRET_ARN": plain}
    resolve_hub_token(Settings(aws_region="us-east-1"), env)
    assert env["HF_TOKEN"] == "hf_abc"
    wrapped = sm.create_secret(Name="acestep/hf-json", SecretString='{"token": "hf_json"}')["ARN"]
    env = {"ACESTEP_HF_TOKEN_SECRET_ARN": wrapped}
    resolve_hub_token(Settings(aws_region="us-east-1"), env)
    assert env["HF_TOKEN"] == "hf_json"
    env = {"ACESTEP_HF_TOKEN_SECRET_ARN": wrapped, "HF_TOKEN": "set-by-hand"}  # an explicit token wins
    resolve_hub_token(Settings(aws_region="us-east-1"), env)
    assert env["HF_TOKEN"] == "set-by-hand"
    env = {}
    resolve_hub_token(Settings(aws_region="us-east-1"), env)
    assert env == {}
